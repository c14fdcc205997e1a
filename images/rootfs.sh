#!/usr/bin/env bash
# Lays out the root filesystem of a tokenfleet image in DIR: the binary in /usr/local/bin, the
# shared libraries it links (from `ldd`, at their own paths, with the dynamic loader), the system CA
# bundle (providers, Redis and mail servers are verified against it), /etc/passwd and /etc/group
# with the unprivileged user 65532 ("nonroot"), and a world-writable /tmp. No shell, no package
# manager: the image runs the one binary.
#
#   images/rootfs.sh BINARY DIR
#
# Used by the Dockerfiles' build stage and by scripts/build-images.sh (from release binaries).
set -euo pipefail
binary=$1
out=$2
[ -x "$binary" ] || { echo "rootfs.sh: $binary is not an executable" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/tmp"
chmod 1777 "$out/tmp"
cp "$binary" "$out/usr/local/bin/"
# Every library the binary links, and the loader (`ldd` prints "name => /path (addr)" and the
# loader as "/lib64/ld-linux-x86-64.so.2 (addr)"; linux-vdso has no file).
ldd "$binary" | awk '/=> \// {print $3} /^\s*\// {print $1}' | while read -r lib; do
    cp -L --parents "$lib" "$out/"
done
ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] || { echo "rootfs.sh: $ca missing (install ca-certificates)" >&2; exit 1; }
cp "$ca" "$out/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/etc/group"
