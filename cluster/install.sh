#!/usr/bin/env bash
# Idempotently install the Debian packages for the local SLURM cluster (cluster/slurm.sh).
# Runs `apt-get update` only when a package is missing. Needs root (or sudo).
# usage: cluster/install.sh            env: VERBOSE=1 to show apt output
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "slurm packages already installed: $(dpkg-query -W -f='${Package}=${Version} ' "${PKGS[@]}")"
  exit 0
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo -E)
fi
log=$(mktemp); trap 'rm -f "$log"' EXIT
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PKGS[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2; echo "install.sh: apt-get failed" >&2; exit 1
fi
[ "${VERBOSE:-0}" = 1 ] && cat "$log"
echo "installed: $(dpkg-query -W -f='${Package}=${Version} ' "${PKGS[@]}")"
