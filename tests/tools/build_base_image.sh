#!/usr/bin/env bash
# The base image of the container tests: Debian bookworm's root filesystem from debootstrap
# (no registry images reach these machines), imported into podman as $BASE_IMAGE. It stands
# in for docker/Dockerfile's python:3.11-slim-bookworm: Debian's python3.11, plus what the
# Dockerfile would otherwise apt-get (tini, procps, iproute2).
#
#   tests/tools/build_base_image.sh            # prints the image name; skips work when it exists
#
# The image name carries a hash of this script, so a changed package list builds a new one.
set -euo pipefail
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs --network-backend netavark)
PACKAGES=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,ca-certificates,tini,procps,iproute2
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tag="$( { cat "$0"; echo "$PACKAGES"; } | sha256sum | cut -c1-12)"
BASE_IMAGE="localhost/morec-base:bookworm-$tag"
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then echo "$BASE_IMAGE"; exit 0; fi
work="$(mktemp -d /var/tmp/morec-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "build_base_image.sh: debootstrap bookworm ($PACKAGES)" >&2
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$MIRROR" >"$work/log" 2>&1 \
    || { tail -20 "$work/log" >&2; grep -iE "error|depends" "$work/rootfs/debootstrap/debootstrap.log" >&2 || true; exit 1; }
chroot "$work/rootfs" python3.11 -m venv /tmp/check-venv >/dev/null || { echo "build_base_image.sh: python3.11 -m venv fails in the root filesystem" >&2; exit 1; }
rm -rf "$work/rootfs/tmp/check-venv" "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
tar -C "$work/rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
echo "$BASE_IMAGE"
