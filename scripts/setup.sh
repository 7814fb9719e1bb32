#!/usr/bin/env bash
# Create .venv and install Easel with torch (its CPU wheel on 3.11); idempotent. The interpreter
# is python3.11 (else python3), or PYTHON=/path/to/python3.12 bash scripts/setup.sh. An existing
# .venv is kept as it is, unless PYTHON names another Python version: then this stops and says so
# (remove .venv to recreate it) rather than delete an environment that may hold a hand-installed
# CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  command -v "$PY" >/dev/null || { echo "scripts/setup.sh: PYTHON=$PY is not an executable" >&2; exit 1; }
else
  PY=python3.11
  command -v "$PY" >/dev/null || PY=python3
fi
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
elif [ -n "${PYTHON:-}" ] && [ "$(pyver .venv/bin/python)" != "$(pyver "$PY")" ]; then
  echo "scripts/setup.sh: .venv is Python $(pyver .venv/bin/python), not the $(pyver "$PY") of PYTHON=$PY;" \
       "remove it (rm -r .venv) and run this again to recreate it" >&2
  exit 1
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the version whose CPU wheel is available offline here (Python 3.11; on 3.12
# PyPI's cp312 wheel of it is the CUDA build, several GB); GPU boxes may install their CUDA build of
# torch beforehand instead (any torch>=2.4 satisfies Easel).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# controlnet_aux (openpose conditions) without its dependencies: its torchvision/timm pins pull a
# CUDA torch onto a CPU box, and its open_pose module, all Easel imports, needs neither
python -c "import importlib.util as u; exit(u.find_spec('controlnet_aux') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps "controlnet-aux==0.0.10"
# insightface depends on opencv-python (GUI build, needs libGL); both it and opencv-python-headless
# install the same cv2 package, and the last one written wins. Write the headless build last so
# `import cv2` works on servers without libGL.
python -m pip install -q --force-reinstall --no-deps "opencv-python-headless>=4.8"
