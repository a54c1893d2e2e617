#!/usr/bin/env bash
# Build the project image with podman as tests/test_containers.py needs it, and print its
# name. Nothing comes from a registry: the base is Debian's root filesystem
# (tests/tools/build_base_image.sh), the Python packages a wheelhouse that `pip download`
# fills through this machine's pip configuration (which finds the local torch CPU wheel),
# mounted into the build (docker/Dockerfile's WHEELS mode, `--no-index`).
#
# Cached: the image is tagged with a hash of everything that goes into it (Dockerfile,
# constraints, pyproject, code, launch scripts, configs, base); an existing tag is reused.
# The wheelhouse is kept per constraints file in $MOREC_CONTAINER_CACHE (default
# /var/cache/morec-test).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs --network-backend netavark)
CACHE="${MOREC_CONTAINER_CACHE:-/var/cache/morec-test}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
base="$(bash tests/tools/build_base_image.sh)"
hash="$( { echo "$base"; find docker pyproject.toml README.md .dockerignore morec_dist launch configs -type f \
           -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -c1-12)"
image="localhost/morec-dist:test-$hash"
if "${PODMAN[@]}" image exists "$image"; then echo "$image"; exit 0; fi

wheels="$CACHE/wheels-$(cat docker/constraints.txt pyproject.toml | sha256sum | cut -c1-12)"
if [[ ! -f "$wheels/.complete" ]]; then
    echo "build_image.sh: filling the wheelhouse $wheels" >&2
    rm -rf "$wheels" && mkdir -p "$wheels"
    reqs="$(mktemp)"
    "$PYTHON" -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" >"$reqs"
    "$PYTHON" -m pip download -q -d "$wheels" --only-binary=:all: -c docker/constraints.txt -r "$reqs" pip setuptools wheel
    "$PYTHON" -m pip download -q -d "$wheels" --only-binary=:all: -c docker/constraints.txt --no-deps torchrec
    rm -f "$reqs"
    touch "$wheels/.complete"
fi
echo "build_image.sh: podman build $image" >&2
start=$SECONDS
"${PODMAN[@]}" build --pull=never -f docker/Dockerfile \
    --build-arg BASE="$base" --build-arg EXTRA=cpu --build-arg WHEELS=/wheels \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -v "$wheels:/wheels:ro" --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
    -t "$image" . >&2
# older test images: drop their tags (the shared dependency layer stays while in use)
for old in $("${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/morec-dist:test-' | grep -vxF "$image"); do
    "${PODMAN[@]}" rmi "$old" >/dev/null 2>&1 || true
done
echo "build_image.sh: built $image in $(( SECONDS - start )) s, $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image") bytes" >&2
echo "$image"
