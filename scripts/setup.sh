#!/usr/bin/env bash
# Creates .venv (once) and installs fastsam3d + fastsam3d-distill into it, editable.
# torch is installed first and pinned (TORCH_SPEC) so that pip never pulls an unpinned CUDA
# build on a CPU machine; set TORCH_SPEC="torch" (or install torch yourself) for a CUDA box.
set -euo pipefail
cd "$(dirname "$0")/.."
# WITH_TORCH=0 makes a venv without PyTorch (e.g. EXTRAS=onnx,io: the ONNX Runtime engine only;
# fastsam3d-distill, which trains with PyTorch, is then left out).
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-torch,io}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ "${WITH_TORCH:-1}" = 0 ]; then
    pip install -q -e "./model[$EXTRAS]"
    exit 0
fi
python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e "./model[$EXTRAS]" -e ./distill
