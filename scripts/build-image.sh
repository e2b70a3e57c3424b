#!/usr/bin/env bash
# Build the switchboard image with no network inside the build: the wheels of
# the project and of all its runtime dependencies are built on the host
# (`pip wheel`, into build/docker-wheels/ inside the build context: deps/ and
# project/, so that a code change leaves the dependency layers cached) and the
# Dockerfile installs them with `pip install --no-index --find-links`.
#
#   scripts/build-base-image.sh     # once: the local base image (no registry needed)
#   scripts/build-image.sh          # -> switchboard:latest FROM switchboard-base:bookworm
#
# Environment:
#   IMAGE       tag to build (default switchboard:latest, what docker-compose.yml runs)
#   BASE_IMAGE  the Dockerfile's base (default switchboard-base:bookworm, the image
#               scripts/build-base-image.sh makes; python:3.11-slim-bookworm works
#               too where a registry is reachable)
#   PYTHON      the interpreter that builds the wheels (default .venv/bin/python,
#               else python3.11, else python3); it must be the base's Python version
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

IMAGE=${IMAGE:-switchboard:latest}
BASE_IMAGE=${BASE_IMAGE:-switchboard-base:bookworm}
WHEELS="$ROOT/build/docker-wheels"

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info failed)"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    case "$BASE_IMAGE" in
        switchboard-base:*) die "base image $BASE_IMAGE is missing: run scripts/build-base-image.sh" ;;
    esac
    say "base image $BASE_IMAGE is not local: docker build will pull it"
fi

if [ -z "${PYTHON:-}" ]; then
    for py in "$ROOT/.venv/bin/python" python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1; then PYTHON=$py; break; fi
    done
fi
[ -n "${PYTHON:-}" ] || die "no Python found to build the wheels (set PYTHON)"

# Binary wheels (cbor2, cryptography, numpy, ...) must match the image's Python.
host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    image_py=$(docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" \
               -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$host_py" = "$image_py" ] ||
        die "$PYTHON is Python $host_py but $BASE_IMAGE has $image_py: set PYTHON to a python$image_py"
fi
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip"

start=$(date +%s)
say "building wheels with $PYTHON (Python $host_py) into build/docker-wheels/"
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
# Build from a clean copy of the tree: setuptools' scratch folder build/lib would
# otherwise carry modules deleted since an earlier build into the wheel.
SRC=$(mktemp -d /tmp/switchboard-src.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./data \
    --exclude=./chaos-runs --exclude=./bench-runs --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude='.*_cache' --exclude=./.hypothesis -cf - . | tar -C "$SRC" -xf -
# The project and every runtime dependency, as the resolver picks them now.
if ! "$PYTHON" -m pip wheel --disable-pip-version-check --wheel-dir "$WHEELS" "$SRC" \
        >"$ROOT/build/pip-wheel.log" 2>&1; then
    tail -n 30 "$ROOT/build/pip-wheel.log" >&2
    die "pip wheel failed (full log: build/pip-wheel.log)"
fi
n=$(find "$WHEELS" -name '*.whl' | wc -l)
ls "$WHEELS"/switchboard-*.whl >/dev/null 2>&1 || die "pip wheel did not build switchboard's wheel"
mkdir "$WHEELS/deps" "$WHEELS/project"
mv "$WHEELS"/switchboard-*.whl "$WHEELS/project/"
mv "$WHEELS"/*.whl "$WHEELS/deps/"
say "$n wheels ($(du -sh "$WHEELS" | cut -f1)) in $(( $(date +%s) - start )) s"

old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
say "docker build -t $IMAGE --build-arg BASE_IMAGE=$BASE_IMAGE (no network inside)"
# --network none: prove the build needs nothing from outside.
if ! docker build --force-rm --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" \
        -f "$ROOT/Dockerfile" "$ROOT" >"$ROOT/build/docker-build.log" 2>&1; then
    tail -n 40 "$ROOT/build/docker-build.log" >&2
    die "docker build failed (full log: build/docker-build.log)"
fi
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
# The image this build replaced would linger untagged: remove it (unless in use).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker rmi "$old_id" >/dev/null 2>&1 || true
fi
say "built $IMAGE in $(( $(date +%s) - start )) s total ($(docker image inspect -f '{{.Size}}' "$IMAGE" |
    awk '{printf "%.0f MB", $1/1e6}'))"
