"""`fastsam3d-distill prepare`: decode every case once and store its training crops
(memory-mapped .npy) for fast loading."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="decode every case once and store its training crops "
        "(memory-mapped .npy) for fast loading",
    )
    p.add_argument("--data", action="append", default=[], help="as for distill; repeatable")
    p.add_argument("--classes", type=int, nargs="*", help="label values to use (default: all)")
    p.add_argument("--min-voxels", type=int, default=100)
    p.add_argument("--lattice-anchor", choices=["centre", "corner"], default="centre")
    p.add_argument("--out", required=True, help="folder for images.npy, targets.npy, manifest")
    p.add_argument("--workers", type=int, default=0, help="processes decoding cases")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..data import check_grids, discover, index_samples
    from ..prepared import prepare_crops

    if not a.data:
        raise ValueError("give --data (dataset folder or list file)")
    cases = [c for src in a.data for c in discover(src)]
    check_grids(cases)
    out = Path(a.out)
    samples = index_samples(cases, classes=a.classes, min_voxels=a.min_voxels)
    if not samples:
        raise ValueError("no samples: every label is empty or filtered out")
    prepare_crops(
        cases,
        samples,
        out,
        anchor=a.lattice_anchor,
        classes=a.classes,
        min_voxels=a.min_voxels,
        workers=a.workers,
    )
    print(f"prepared {len(samples)} crops of {len(cases)} cases in {out}")
    return 0
