#!/usr/bin/env bash
# Check what the test suite needs beyond Python. Under CI=true a missing
# prerequisite is a failure: the chaos and docker suites must never skip silently.
set -uo pipefail
# As root on Debian/Ubuntu, install what is missing first (a fresh CI machine).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=()
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v nft >/dev/null 2>&1 || need+=(nftables)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    [ -x /usr/share/zookeeper/bin/zkServer.sh ] || dpkg -s zookeeper >/dev/null 2>&1 \
        || need+=(zookeeper)  # the side-by-side benchmark
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing ${need[*]}" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
            >/dev/null 2>&1 || echo "could not install ${need[*]}" >&2
    fi
fi
missing=()
[ "$(id -u)" = 0 ] || missing+=("root (chaos tests create network namespaces)")
command -v ip >/dev/null 2>&1 && ip netns list >/dev/null 2>&1 || missing+=("ip netns (iproute2)")
command -v nft >/dev/null 2>&1 || command -v iptables >/dev/null 2>&1 || missing+=("nftables or iptables")
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    missing+=("a running Docker engine")
fi
if [ ${#missing[@]} -gt 0 ]; then
    for m in "${missing[@]}"; do echo "prerequisite missing: $m" >&2; done
    if [ "${CI:-}" = true ]; then
        echo "CI=true: refusing to run with missing prerequisites" >&2
        exit 1
    fi
    echo "(outside CI the tests that need them are skipped)" >&2
fi
exit 0
