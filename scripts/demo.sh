#!/usr/bin/env bash
# The main job, end to end: set up the environment, then segment a real brain MRI (the MNI152
# template that ships inside the nilearn wheel, so no data download) from one click with the
# official FastSAM3D weights, writing out/mask.nii.gz and out/preview.png.
#
#   bash scripts/demo.sh                        # weights from the cache (downloaded once)
#   bash scripts/demo.sh --checkpoint PATH      # or FASTSAM3D_CHECKPOINT=PATH bash scripts/demo.sh
#   bash scripts/demo.sh --fixture              # offline pipeline check with UNTRAINED weights
#   bash scripts/demo.sh --no-setup ...         # use the current python (skip scripts/setup.sh)
#
# The click is in the left lateral ventricle (RAS -12, -10, 23 mm). Exit status: 0 done,
# 3 no weights available (the message says how to get them), other non-zero on errors.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT=${FASTSAM3D_CHECKPOINT:-}
FIXTURE=0
SETUP=1
POINT=${DEMO_POINT:--12,-10,23}
while [ $# -gt 0 ]; do
  case "$1" in
    --checkpoint) CHECKPOINT=${2:?--checkpoint needs a path}; shift 2 ;;
    --fixture) FIXTURE=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$SETUP" = 1 ]; then
  echo "== setting up .venv (scripts/setup.sh)"
  bash scripts/setup.sh
  # shellcheck disable=SC1091
  . .venv/bin/activate
  python -c "import nilearn" 2>/dev/null || pip install -q "nilearn>=0.10"
fi
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3

mkdir -p out
echo "== writing the MNI152 template (nilearn, offline) to out/mni152.nii.gz"
"$PY" - <<'EOF'
import nibabel as nib
from nilearn.datasets import load_mni152_template

nib.save(load_mni152_template(resolution=1), "out/mni152.nii.gz")
EOF

ARGS=(segment out/mni152.nii.gz --point="$POINT" --out out/mask.nii.gz --preview out/preview.png)
if [ "$FIXTURE" = 1 ]; then
  echo "== FIXTURE MODE: untrained deterministic weights. This checks the pipeline offline;"
  echo "   the mask is NOT a segmentation."
  ARGS+=(--fixture-weights)
elif [ -n "$CHECKPOINT" ]; then
  ARGS+=(--checkpoint "$CHECKPOINT")
else
  ARGS+=(--model fastsam3d)
fi

echo "== fastsam3d ${ARGS[*]}"
set +e
"$PY" -m fastsam3d.cli "${ARGS[@]}"
rc=$?
set -e
if [ "$rc" = 3 ]; then
  cat >&2 <<'EOF'

demo.sh: no FastSAM3D weights here. Either
  - run `fastsam3d download fastsam3d` where the network is reachable (the file is cached and
    its SHA-256 recorded), then run this script again;
  - or pass a local copy: bash scripts/demo.sh --checkpoint /path/to/FastSAM3D.pth
    (or FASTSAM3D_CHECKPOINT=/path/to/FastSAM3D.pth);
  - or see the pipeline work offline with untrained weights: bash scripts/demo.sh --fixture
EOF
  exit 3
fi
[ "$rc" = 0 ] || exit "$rc"
echo "== done: out/mask.nii.gz, out/preview.png"
