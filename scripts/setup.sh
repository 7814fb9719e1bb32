#!/usr/bin/env bash
# Create .venv (Python 3.11) and install Easel with the CPU torch wheel; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the version whose CPU wheel is available offline here; GPU boxes may
# install their CUDA build of torch beforehand instead (any torch>=2.4 satisfies Easel).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# insightface depends on opencv-python (GUI build, needs libGL); both it and opencv-python-headless
# install the same cv2 package, and the last one written wins. Write the headless build last so
# `import cv2` works on servers without libGL.
python -m pip install -q --force-reinstall --no-deps "opencv-python-headless>=4.8"
