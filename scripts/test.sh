#!/usr/bin/env bash
# Set up, then run the whole test suite (a real server on loopback ports, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The playground's browser tests drive Debian's chromium with Playwright (no browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
