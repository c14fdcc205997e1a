#!/usr/bin/env bash
# Builds the broker and agent images from the release binaries with buildah (images/*.Dockerfile,
# the `rootfs` build context made by images/rootfs.sh, so no toolchain image is pulled), checks
# each image's configuration, and runs each where a container runtime works:
#
#   bash scripts/build-images.sh            # build and check
#   bash scripts/build-images.sh --no-run   # build and check the configuration only
#
# Images land in a private store under target/images/storage (vfs driver), tagged
# tokenfleet/tokenfleet-broker:<version> and tokenfleet/tokenfleet-agent:<version>; export one with
#   buildah --root target/images/storage --runroot target/images/run --storage-driver vfs \
#       push tokenfleet/tokenfleet-broker:<version> oci-archive:broker.tar
# Run from the test command (scripts/test.sh). Exits non-zero on any failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
run=1
[ "${1:-}" = "--no-run" ] && run=0

step() { printf '\n==> images: %s\n' "$*" >&2; }
fail() { echo "build-images: $*" >&2; exit 1; }

for tool in buildah podman jq; do
    command -v "$tool" >/dev/null || fail "$tool not found (scripts/test-setup.sh installs it)"
done
store=(--root "$PWD/target/images/storage" --runroot "$PWD/target/images/run" --storage-driver vfs)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
source_url=$(git remote get-url origin 2>/dev/null || echo unknown)

step "release binaries"
cargo build --release --locked -p tokenfleet-broker --bin tokenfleet-broker \
    -p tokenfleet-agent --bin tokenfleet-agent

mkdir -p target/images/context
for name in broker agent; do
    bin=tokenfleet-$name
    tag=tokenfleet/$bin:$version
    step "$tag"
    bash images/rootfs.sh "target/release/$bin" "target/images/$name-rootfs"
    buildah "${store[@]}" bud --quiet --layers=false -f "images/$name.Dockerfile" \
        --build-context "rootfs=target/images/$name-rootfs" \
        --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
        --build-arg "SOURCE=$source_url" -t "$tag" target/images/context >/dev/null

    # The configuration every deployment relies on.
    config=$(buildah "${store[@]}" inspect --type image "$tag" | jq '.OCIv1.config')
    user=$(jq -r '.User' <<<"$config")
    entrypoint=$(jq -c '.Entrypoint' <<<"$config")
    ports=$(jq -c '.ExposedPorts | keys' <<<"$config")
    labels=$(jq -c '.Labels' <<<"$config")
    [ "$user" = "65532:65532" ] || fail "$tag: user is '$user', not 65532:65532"
    [ "$entrypoint" = "[\"/usr/local/bin/$bin\"]" ] || fail "$tag: entrypoint $entrypoint"
    case $name in
        broker) want='["50051/tcp","8080/tcp"]' ;;
        agent) want='["1110/tcp","2525/tcp","9465/tcp"]' ;;
    esac
    [ "$ports" = "$want" ] || fail "$tag: exposed ports $ports, expected $want"
    for label in title source version revision licenses; do
        value=$(jq -r --arg l "org.opencontainers.image.$label" '.[$l] // empty' <<<"$labels")
        [ -n "$value" ] || fail "$tag: no org.opencontainers.image.$label label"
    done
    [ "$(jq -r '.["org.opencontainers.image.version"]' <<<"$labels")" = "$version" ] \
        || fail "$tag: version label is not $version"
    [ "$(jq -r '.["org.opencontainers.image.licenses"]' <<<"$labels")" = "Apache-2.0" ] \
        || fail "$tag: licenses label"
    # No shell or other executable besides the binary.
    mount=$(buildah "${store[@]}" from --quiet "$tag")
    root=$(buildah "${store[@]}" mount "$mount")
    for shell in bin/sh usr/bin/sh bin/bash; do
        [ ! -e "$root/$shell" ] || fail "$tag: /$shell exists"
    done
    size=$(du -sm "$root" | cut -f1)
    buildah "${store[@]}" umount "$mount" >/dev/null
    buildah "${store[@]}" rm "$mount" >/dev/null
    echo "images: $tag user=$user entrypoint=$entrypoint ports=$ports size=${size}MiB"
done

# Earlier builds of the same tags are dangling now: drop them so repeated runs do not fill the disk.
buildah "${store[@]}" rmi --prune >/dev/null 2>&1 || true

[ "$run" = 1 ] || exit 0

# This machine's container runtime: crun refuses hybrid cgroups here and setrlimit is denied, so
# runc with lowered limits; the host network reaches the broker on loopback.
runtime=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)
step "run: --version"
for name in broker agent; do
    out=$(podman "${store[@]}" run --rm "${runtime[@]}" "tokenfleet/tokenfleet-$name:$version" --version) \
        || fail "tokenfleet-$name image does not run"
    [[ $out == "tokenfleet-$name $version" ]] || fail "tokenfleet-$name --version printed '$out'"
    echo "images: $out runs from the image"
done

step "run: the broker serves /healthz and /readyz from its image"
state=$(mktemp -d)
trap 'podman "${store[@]}" rm -f tf-image-check >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
chmod 0777 "$state"
grpc=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
http=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
podman "${store[@]}" run --rm "${runtime[@]}" "tokenfleet/tokenfleet-broker:$version" generate-key \
    > "$state/seal.key"
chmod 0644 "$state/seal.key"
cat > "$state/broker.toml" <<TOML
state_dir = "/state/data"
[grpc]
listen = "127.0.0.1:$grpc"
[http]
listen = "127.0.0.1:$http"
[seal]
keys = [{ id = "k1", key_file = "/state/seal.key" }]
TOML
podman "${store[@]}" run -d --name tf-image-check "${runtime[@]}" -v "$state:/state" \
    "tokenfleet/tokenfleet-broker:$version" --config /state/broker.toml serve >/dev/null
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fsS "http://127.0.0.1:$http/healthz" >/dev/null || fail "broker image: /healthz does not answer"
curl -fsS "http://127.0.0.1:$http/readyz" >/dev/null || fail "broker image: /readyz does not answer"
owner=$(stat -c %u "$state/data")
[ "$owner" = 65532 ] || fail "broker image: state written as uid $owner, not 65532"
podman "${store[@]}" stop -t 20 tf-image-check >/dev/null
code=$(podman "${store[@]}" inspect tf-image-check --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "broker image: exit code $code after SIGTERM"
echo "images: broker image served /healthz and /readyz as uid 65532 and drained on SIGTERM"
