#!/usr/bin/env bash
# Installs what the relay benchmark (`bench relay`, tests/src/bin/bench/relay.rs) needs beyond the
# test suite; idempotent and quiet when nothing is missing. Not part of the test setup.
#
#   Debian packages  postfix, sasl2-bin, libsasl2-modules (the Postfix baseline: its own instance
#                    with its own config dir and queue, Cyrus SASL AUTH PLAIN from a sasldb file)
#                    linux-perf (profiles: `perf record -g -p PID` during the benchmark)
#   .venv-bench/     emailproxy from PyPI (the emailproxy baseline; run headless with --no-gui)
#
# Never starts a system service: a policy-rc.d forbids it while packages install, and a postfix
# master that the install started anyway is stopped (the benchmark runs `postfix -c DIR start` on
# a config dir of its own, with inet_interfaces = loopback-only).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv-bench
apt_packages=(postfix sasl2-bin libsasl2-modules linux-perf)

say() { echo "bench-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
for pkg in "${apt_packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if [[ ! -x $venv/bin/python ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi

if ((${#missing[@]})); then
    ((EUID == 0)) || die "need root to install: ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    policy=/usr/sbin/policy-rc.d
    own_policy=false
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# written by tokenfleet scripts/bench-setup.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=true
        trap 'rm -f "$policy"' EXIT
    fi
    master_was_running=false
    pgrep -f '/usr/lib/postfix/sbin/master' >/dev/null && master_was_running=true
    # A "No configuration" postfix: no system mail setup, nothing listening.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt_log=$(mktemp)
    if ! { apt-get update -qq &&
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get failed"
    fi
    rm -f "$apt_log"
    if $own_policy; then
        rm -f "$policy"
        trap - EXIT
    fi
    if ! $master_was_running && pgrep -f '/usr/lib/postfix/sbin/master' >/dev/null; then
        say "stopping the postfix service the install started"
        postfix stop >/dev/null 2>&1 || true
    fi
fi

if [[ ! -x $venv/bin/emailproxy ]]; then
    say "creating $venv with emailproxy"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check emailproxy
fi
say "ready: postfix $(postconf -d -h mail_version 2>/dev/null), perf $(perf version 2>/dev/null | cut -d' ' -f3), emailproxy in $venv"
