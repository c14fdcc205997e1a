#!/usr/bin/env bash
# Builds the broker variants behind README's "What bounds target 1 now" (issue 15): each patch
# in scripts/issuance-variants/ takes one part of an issuance out (floor: every call answered
# with a copy of the first answer; no-audit: issuances not audited; no-commit: appends answered
# without being queued or written; no-sync: the journal written but never synced). Benchmark
# builds only: each one breaks a guarantee on purpose and is never installed. One more is a
# design that keeps every guarantee and was measured and not kept (inline-commit: each group
# committed by one of its own appends on its task, holding a lock, instead of a committer thread;
# README "Committing without the thread hop").
#
#   bash scripts/issuance-variants.sh [NAME...]     # default: all of them
#   bash scripts/issuance-variants.sh --check       # each patch still applies (scripts/test.sh)
#   target/release/bench issuance --store embedded --rounds 3 \
#       --broker-bin target/variants/tokenfleet-broker-floor
#
# Each patch is applied to the working tree, the release broker built and copied to
# target/variants/tokenfleet-broker-NAME, and the patch taken out again (also on failure or
# interrupt). The files a patch touches must have no uncommitted changes.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=scripts/issuance-variants
if [[ ${1:-} == --check ]]; then
    # A change to the code a patch touches must bring the patch along, or README's figures can
    # no longer be reproduced.
    for patch in "$dir"/*.patch; do
        git apply --check "$patch" || {
            echo "issuance-variants: $patch no longer applies; update it with the code it patches" >&2
            exit 1
        }
    done
    echo "issuance-variants: every patch in $dir applies"
    exit 0
fi
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for patch in "$dir"/*.patch; do names+=("$(basename "$patch" .patch)"); done
fi
mkdir -p target/variants
applied=
revert() { [[ -z $applied ]] || git apply -R "$applied"; applied=; }
trap revert EXIT
for name in "${names[@]}"; do
    patch=$dir/$name.patch
    [[ -f $patch ]] || { echo "issuance-variants: no variant '$name' ($patch)" >&2; exit 2; }
    for file in $(git apply --numstat "$patch" | cut -f3); do
        git diff --quiet HEAD -- "$file" || {
            echo "issuance-variants: $file has uncommitted changes; commit or stash them first" >&2
            exit 1
        }
    done
    git apply "$patch"
    applied=$patch
    cargo build --release -p tokenfleet-broker --bin tokenfleet-broker
    cp target/release/tokenfleet-broker "target/variants/tokenfleet-broker-$name"
    revert
    echo "issuance-variants: target/variants/tokenfleet-broker-$name"
done
# The release broker left behind is a variant's: build the real one again.
cargo build --release -p tokenfleet-broker --bin tokenfleet-broker
