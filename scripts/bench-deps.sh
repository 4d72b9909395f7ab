#!/usr/bin/env bash
# make bench-deps: the Debian packages the benchmarks need, installed when
# missing, the way the Makefile's apt_install macro does it (dpkg -s decides
# what is missing; as root apt-get installs it, otherwise the command to run
# is printed and this fails).
#   scripts/bench-deps.sh PACKAGE...
# Extra care for nginx: Debian's package starts a system nginx on port 80
# from its postinst. While the packages install, a policy-rc.d that denies
# every start is put in place (unless the machine already has one) and
# removed afterwards; a freshly installed nginx service is then disabled
# (systemctl disable --now under systemd, update-rc.d otherwise), so the only
# nginx that runs is the benchmark's own, on its own port and config.
# nodejs counts as present when a `node` is on PATH, however it came.
set -euo pipefail

POLICY=/usr/sbin/policy-rc.d
missing=()
for p in "$@"; do
    if [ "$p" = nodejs ] && command -v node >/dev/null 2>&1; then continue; fi
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
((${#missing[@]})) || exit 0

if [ "$(id -u)" != 0 ]; then
    echo "make bench-deps: missing packages: ${missing[*]}" >&2
    echo "run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

had_nginx=0
dpkg -s nginx >/dev/null 2>&1 && had_nginx=1
own_policy=0
cleanup() { if ((own_policy)); then rm -f "$POLICY"; fi; }
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# make bench-deps: no service starts while packages install\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    own_policy=1
fi

echo "make bench-deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null

# A system nginx installed just now: keep it from running, now and at boot.
if ((!had_nginx)) && dpkg -s nginx >/dev/null 2>&1; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    else
        if [ -x /etc/init.d/nginx ] && [ -s /run/nginx.pid ]; then
            /etc/init.d/nginx stop >/dev/null 2>&1 || true
        fi
        update-rc.d nginx disable >/dev/null 2>&1 || true
    fi
    echo "make bench-deps: the system nginx service is disabled (the benchmarks run their own)"
fi
