#!/usr/bin/env bash
# Creates .venv (once) and installs fastsam3d + fastsam3d-distill into it, editable.
# torch is installed first and pinned (TORCH_SPEC) so that pip never pulls an unpinned CUDA
# build on a CPU machine; set TORCH_SPEC="torch" (or install torch yourself) for a CUDA box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-io}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e "./model[$EXTRAS]" -e ./distill
