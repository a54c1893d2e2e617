#!/usr/bin/env bash
# Install what tests/test_containers.py needs from Debian: podman (with runc: crun fails on
# this machine's hybrid cgroups), debootstrap for the base root filesystem (no registry
# images reach these machines), uidmap, slirp4netns and fuse-overlayfs for podman's
# networking and storage. Idempotent: apt runs only when something is missing, and
# `apt-get update` at most once.
set -euo pipefail
need=()
for pair in podman:podman runc:runc debootstrap:debootstrap newuidmap:uidmap \
            slirp4netns:slirp4netns fuse-overlayfs:fuse-overlayfs iptables:iptables; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# the network plugins of podman 4.3 (netavark, aardvark for name resolution in a network)
[[ -x /usr/lib/podman/netavark ]] || need+=(netavark)
[[ -x /usr/lib/podman/aardvark-dns ]] || need+=(aardvark-dns)
if (( ${#need[@]} == 0 )); then exit 0; fi
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
echo "install_containers.sh: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
