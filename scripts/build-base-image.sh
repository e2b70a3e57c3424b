#!/usr/bin/env bash
# Build a local Debian bookworm base image with Python 3.11, without a container
# registry: a `debootstrap --variant=minbase` root filesystem with python3 and
# python3-venv, imported with `docker import`. Use it as the Dockerfile's base:
#
#   scripts/build-base-image.sh                 # -> switchboard-base:bookworm
#   scripts/build-image.sh                      # builds FROM it (see that script)
#
# Users who can pull from a registry do not need this: the Dockerfile's default
# base is python:3.11-slim-bookworm.
#
# Environment:
#   BASE_IMAGE     image name to create (default switchboard-base:bookworm)
#   DEBIAN_MIRROR  Debian mirror (default: the first deb.debian.org-style URI of this
#                  machine's apt sources, else http://deb.debian.org/debian)
#   FORCE=1        rebuild even if the image exists
# Needs root (debootstrap) and a Docker engine; installs debootstrap with apt-get
# if it is missing.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-switchboard-base:bookworm}
SUITE=bookworm

say() { printf 'build-base-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "$BASE_IMAGE exists (FORCE=1 rebuilds it)"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "debootstrap needs root (run with sudo)"
docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info failed)"
if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and apt-get is not available"
    say "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

if [ -z "${DEBIAN_MIRROR:-}" ]; then
    DEBIAN_MIRROR=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
                      grep -hs '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } |
                    grep -E '/debian/?$' | head -n1 || true)
    DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi

WORK=$(mktemp -d /tmp/switchboard-rootfs.XXXXXX)
cleanup() {
    # debootstrap may leave /proc or /sys mounted in the target after a failure
    for m in proc sys dev/pts dev; do
        mountpoint -q "$WORK/rootfs/$m" 2>/dev/null && umount -l "$WORK/rootfs/$m" || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

start=$(date +%s)
say "debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR (about a minute)"
if ! debootstrap --variant=minbase --include=python3,python3-venv \
        "$SUITE" "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [ -f "$WORK/rootfs/debootstrap/debootstrap.log" ] && tail -n 30 "$WORK/rootfs/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi

# Make the tree a clean container filesystem: no package caches, no host files.
R="$WORK/rootfs"
chroot "$R" apt-get clean
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/log/*.log \
       "$R"/var/log/apt/* "$R"/tmp/* "$R"/var/tmp/* "$R"/root/.cache
: > "$R/etc/resolv.conf"
: > "$R/etc/hostname"
printf 'deb %s %s main\n' "$DEBIAN_MIRROR" "$SUITE" > "$R/etc/apt/sources.list"
version=$(chroot "$R" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')

say "importing the root filesystem as $BASE_IMAGE (python $version)"
tar --numeric-owner -C "$R" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "debootstrap --variant=minbase $SUITE + python3 python3-venv" \
        - "$BASE_IMAGE" >/dev/null
say "built $BASE_IMAGE in $(( $(date +%s) - start )) s"
