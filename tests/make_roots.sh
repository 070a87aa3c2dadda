#!/bin/sh
# Build the Debian python3-minimal roots that tests/test_minimal_hosts.py runs
# certgrab.py in: Debian 12 (bookworm, Python 3.11, OpenSSL 3.0) and Debian 11
# (bullseye, Python 3.9, OpenSSL 1.1.1). Each is a debootstrap "minbase" root
# plus python3-minimal and nothing else: no CA certificates, no json, no ctypes.
#
#   sh tests/make_roots.sh [SUITE ...]        (default: bookworm bullseye)
#
# Roots go to $CERTGRAB_ROOTS/SUITE (default /var/cache/certgrab-roots) and are
# only built when missing; a finished root holds a file named .certgrab-complete.
# Needs root and debootstrap (apt-get install debootstrap). About 30 s each.
# CERTGRAB_DEBIAN_MIRROR overrides debootstrap's default mirror.
set -eu

ROOTS=${CERTGRAB_ROOTS:-/var/cache/certgrab-roots}
MIRROR=${CERTGRAB_DEBIAN_MIRROR:-}
[ $# -gt 0 ] || set -- bookworm bullseye

if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
    echo "make_roots: debootstrap not found (apt-get install debootstrap)" >&2
    exit 1
fi
PATH=$PATH:/usr/sbin:/sbin
mkdir -p "$ROOTS"

for suite in "$@"; do
    root=$ROOTS/$suite
    if [ -e "$root/.certgrab-complete" ]; then
        echo "make_roots: $root already built"
        continue
    fi
    echo "make_roots: building $root (debootstrap --variant=minbase --include=python3-minimal $suite)"
    rm -rf "$root.tmp"
    # shellcheck disable=SC2086  # $MIRROR is empty or one word
    debootstrap --variant=minbase --include=python3-minimal \
        "$suite" "$root.tmp" $MIRROR >"$ROOTS/$suite.log" 2>&1 || {
        echo "make_roots: debootstrap $suite failed; last lines of $ROOTS/$suite.log:" >&2
        tail -n 20 "$ROOTS/$suite.log" >&2
        exit 1
    }
    rm -rf "$root.tmp/var/cache/apt/archives/"*.deb "$root.tmp/var/lib/apt/lists/"* || true
    chroot "$root.tmp" python3 -c 'import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)' \
        | sed "s|^|make_roots: $suite: python |"
    touch "$root.tmp/.certgrab-complete"
    rm -rf "$root"
    mv "$root.tmp" "$root"
done
