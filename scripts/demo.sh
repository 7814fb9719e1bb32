#!/usr/bin/env bash
# Set up, then run the main job: a server on the embedded default (SQLite, local worker, tiny
# offline models), the seed's request for wiro/text-to-image-sd-lora, and the PNG paths it produced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/easel demo --data-dir .easel-demo
