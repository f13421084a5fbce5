#!/usr/bin/env bash
# Install nginx for the tests under tests/data that read shards over HTTP (and for
# bench/bench_remote_data.py). The tests start and stop their own nginx on 127.0.0.1 (a free port,
# a config and logs in a temporary directory): nothing is started here, and the packaged service
# is kept from starting during the install (a policy-rc.d that refuses, as in Docker images).
#
# Run as root on Debian/Ubuntu. Idempotent: returns at once when nginx is already installed.
# Without it the HTTP tests skip and say why.
set -euo pipefail

log() { echo "nginx_install: $*" >&2; }

if command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; then
    log "nginx is installed: $(/usr/sbin/nginx -v 2>&1 || nginx -v 2>&1)"
    exit 0
fi
[[ $(id -u) == 0 ]] || { log "must run as root (it installs a package)"; exit 1; }

POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\n# written by .ci/nginx_install.sh for the install only\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    made_policy=1
    trap 'rm -f "$POLICY"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
install() {
    # nginx-light (Debian 12 and older) is the small build; later releases have only nginx.
    local pkg
    for pkg in nginx-light nginx; do
        apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 && return 0
    done
    return 1
}
# Package lists can be stale on a fresh image: update only when the plain install fails.
install || { apt-get update -q >/dev/null && install; } || { log "apt-get install nginx failed"; exit 1; }
((made_policy)) && log "the packaged nginx service was not started"
log "installed: $(/usr/sbin/nginx -v 2>&1)"
