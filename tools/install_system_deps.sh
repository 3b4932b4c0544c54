#!/usr/bin/env bash
# Installs the Debian packages the test suite talks to, only when missing: SLURM + munge, headless Chromium.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/cluster/install.sh" >/dev/null
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
