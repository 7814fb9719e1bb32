#!/usr/bin/env bash
# Set up, then run the main job: a server on the embedded default (SQLite, local worker, tiny
# offline models), every seed's own request, and the PNG paths and URLs it produced. Arguments go
# to `easel demo` (`--tool OWNER/SLUG` runs one tool).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/easel demo --data-dir .easel-demo "$@"
