#!/usr/bin/env bash
# The whole test suite, as CI runs it: `bash scripts/test.sh` from anywhere in the checkout.
#
#   1. install the real components the tests use (scripts/test-setup.sh; quick when present)
#   2. rustfmt and clippy, to fail fast on the cheap checks
#   3. doctests (nextest does not run them)
#   4. every unit, integration and end-to-end test under nextest, profile `ci`
#      (.config/nextest.toml), each writing its TRACE logs and the secrets it made to
#      target/test-logs (tokenfleet_testkit::logs)
#   5. the container images (scripts/build-images.sh): built from the release binaries with
#      buildah, their configuration checked, run with podman
#   6. the log scan (tests/tests/zz_log_scan.rs): no secret in any of those logs — last, after
#      every test has logged
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "test setup"
bash scripts/test-setup.sh
export PATH="$PWD/.tools/bin:$PWD/.venv-test/bin:$PATH"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "benchmark variant patches still apply"
bash scripts/issuance-variants.sh --check

step "doctests"
cargo test --workspace --doc

step "binaries the end-to-end tests start"
# The same command tests/src/agent_site.rs (E2E_BINARIES_BUILD) runs inside the tests; built here
# once, the tests find it fresh instead of each waiting on the build.
cargo build -p tokenfleet-agent --bin tokenfleet-agent -p tokenfleetctl --bin tokenfleetctl \
  -p tokenfleet-broker --bin tokenfleet-broker

step "cargo nextest"
# Fresh logs: the scan must see this run's tests only.
rm -rf "${TOKENFLEET_TEST_LOG_DIR:-target/test-logs}"
# The default filter (.config/nextest.toml) leaves out the log scan, which runs after everything.
cargo nextest run --workspace --all-targets --profile ci

step "container images: built from the release binaries, checked, run"
bash scripts/build-images.sh

step "log scan: no secret in any test log"
# `--workspace --all-targets` like the run above, so cargo unifies features the same way and reuses
# every artefact (with `-p tokenfleet-testkit` alone it rebuilt the broker and agent libraries); the
# profile's default filter selects only the scan.
cargo nextest run --workspace --all-targets --profile log-scan
