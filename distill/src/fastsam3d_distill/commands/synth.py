"""`fastsam3d-distill synth`: write a synthetic nnU-Net dataset (demos, smoke tests)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("synth", help="write a synthetic nnU-Net dataset (demos, smoke tests)")
    p.add_argument("--out", required=True, help="dataset folder to write (nnU-Net layout)")
    p.add_argument("--cases", type=int, default=8, help="number of phantom cases (default 8)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 96, 96],
        metavar=("K", "J", "I"),
        help="voxels per case, [k, j, i] (default 96 96 96)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.5, 1.5, 1.5],
        metavar="MM",
        help="voxel size in mm, i j k (default 1.5 1.5 1.5)",
    )
    p.add_argument(
        "--oblique", type=float, default=0.0, help="max rotation of the affine, degrees (default 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..synthetic import write_nnunet_dataset

    root = write_nnunet_dataset(
        a.out,
        n_cases=a.cases,
        seed=a.seed,
        shape=tuple(a.shape),
        spacing=tuple(a.spacing),
        oblique_deg=a.oblique,
    )
    print(f"wrote {a.cases} synthetic cases to {root}")
    return 0
