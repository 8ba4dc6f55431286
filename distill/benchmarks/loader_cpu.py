"""Volumes/s of the training input path alone on the CPU: NIfTI files decoded per sample
(``CropDataset``) against the same crops prepared once (``fastsam3d-distill prepare``,
``PreparedCropDataset``), each through DataLoader workers as training reads them.

    python distill/benchmarks/loader_cpu.py --out distill/benchmarks/results/loader_cpu.json

Writes a synthetic nnU-Net dataset (gzip NIfTI, 1 mm, the GPU benchmark's case shape) into a
temporary folder; no GPU, no network.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from gpu_distill import _write_case, loader_rate  # noqa: E402

from fastsam3d_distill.data import CropDataset, discover, index_samples  # noqa: E402
from fastsam3d_distill.distributed import init_distributed  # noqa: E402
from fastsam3d_distill.prepared import PreparedCropDataset, prepare_crops  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="JSON file")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="per measured path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="loader_cpu_"))
    root = tmp / "nifti"
    for c in range(args.cases):
        _write_case((str(root), c, tuple(args.shape)))
    cases = discover(root)
    samples = index_samples(cases, min_voxels=100)
    nifti = loader_rate(CropDataset(cases, samples), args.batch, args.workers, args.seconds, env)
    t0 = time.perf_counter()
    prepare_crops(cases, samples, tmp / "prepared", min_voxels=100, workers=args.workers)
    t_prep = time.perf_counter() - t0
    res = {}
    for labels in (True, False):
        ds = PreparedCropDataset(tmp / "prepared", labels=labels)
        res[labels] = loader_rate(ds, args.batch, args.workers, args.seconds, env)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread, {args.workers} workers",
        "torch": torch.__version__,
        "cases": args.cases,
        "shape_kji": args.shape,
        "samples": len(samples),
        "batch": args.batch,
        "nifti_per_sample": nifti,
        "prepare_s": t_prep,
        "prepared_with_labels": res[True],
        "prepared_images_only": res[False],
        "speedup": res[True]["volumes_per_s"] / nifti["volumes_per_s"],
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(
        f"NIfTI per sample {nifti['volumes_per_s']:.2f} volumes/s; prepared "
        f"{res[True]['volumes_per_s']:.1f} (with labels), {res[False]['volumes_per_s']:.1f} "
        f"(images only); prepare {t_prep:.1f} s for {len(samples)} samples"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
