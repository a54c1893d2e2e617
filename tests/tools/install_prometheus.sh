#!/usr/bin/env bash
# Installs the Prometheus server (Debian's `prometheus` package) that the scrape tests start
# themselves on loopback. Idempotent: does nothing when /usr/bin/prometheus already exists.
#
# The tests run their own Prometheus with a generated config, so the package's system service
# must not run: a policy-rc.d keeps the postinst from starting it, and any service that got
# started anyway (systemd hosts) is stopped and disabled.
set -euo pipefail

PROMETHEUS=/usr/bin/prometheus
if [[ -x "$PROMETHEUS" ]]; then
    exit 0
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { echo "install_prometheus.sh: need root or sudo to apt-get install prometheus" >&2; exit 1; }
    SUDO=(sudo)
fi

# Forbid service starts during the install only if no site policy exists already.
POLICY=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    own_policy=1
fi
cleanup() { if [[ $own_policy == 1 ]]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# On a systemd host the unit may be enabled (and started despite policy-rc.d on some setups).
if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif command -v service >/dev/null; then
    "${SUDO[@]}" service prometheus stop >/dev/null 2>&1 || true
fi

"$PROMETHEUS" --version 2>&1 | head -1
