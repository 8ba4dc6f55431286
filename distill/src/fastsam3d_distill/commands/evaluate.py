"""`fastsam3d-distill evaluate`: click-simulation Dice on held-out cases."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..errors import DistillUsageError
from ..models import load_spec, parse_overrides
from ..recipes import apply_recipe


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="click-simulation Dice on held-out cases")
    p.add_argument("--model", required=True, help="model checkpoint to score (.pth/.safetensors)")
    p.add_argument("--model-config", default=None, help="config name overriding detection")
    p.add_argument(
        "--model-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (tests)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help="held-out dataset folder or case list (repeatable)",
    )
    p.add_argument("--classes", type=int, nargs="*", help="label values to score (default: all)")
    p.add_argument(
        "--min-voxels",
        type=int,
        default=100,
        help="skip structures smaller than this on the original grid (default 100)",
    )
    p.add_argument(
        "--prepared",
        default=None,
        metavar="DIR",
        help="held-out crops written by `prepare` (the same crops, without decoding the NIfTI "
        "files; the original grid still reads them); must match --lattice-anchor, "
        "--classes and --min-voxels",
    )
    p.add_argument("--clicks", type=int, default=10, help="clicks per structure (default 10)")
    p.add_argument(
        "--recipe",
        choices=["released", "paper", "ours"],
        default="released",
        help="sets the click protocol (default released)",
    )
    p.add_argument(
        "--protocol",
        choices=["released", "ours"],
        default=None,
        help="released: clicks 1-2 RITM, then uniform random error voxels, seeded; "
        "ours: deterministic interior / largest-error centre",
    )
    p.add_argument("--seed", type=int, default=2023, help="click seed (default 2023)")
    p.add_argument(
        "--lattice-anchor",
        choices=["centre", "corner"],
        default="centre",
        help="crop lattice (default centre; corner = the pre-2025 torchio grid)",
    )
    p.add_argument(
        "--grids",
        nargs="+",
        choices=["crop", "original"],
        default=["crop", "original"],
        help="where Dice is scored (default both)",
    )
    p.add_argument("--out", required=True, help="folder for the JSON and PNG results")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..data import CropDataset, check_grids, discover, index_samples
    from ..evaluate import evaluate_crops, evaluate_volumes, summarise, write_report

    apply_recipe(a, "evaluate")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cases = [c for src in a.data for c in discover(src)]
    prepared = None
    if a.prepared:  # the crops as `prepare` stored them: the same items as from the NIfTI files
        from ..prepared import PreparedCropDataset

        prepared = PreparedCropDataset(
            a.prepared,
            expect={
                "lattice_anchor": a.lattice_anchor,
                "classes": a.classes,
                "min_voxels": a.min_voxels,
            },
        )
        if cases and cases != prepared.cases:
            raise DistillUsageError(
                f"--prepared {a.prepared} was made from other cases than --data"
            )
        cases = prepared.cases
    if not cases:
        raise DistillUsageError("give --data with held-out cases (or --prepared)")
    check_grids(cases)  # before any model work
    if prepared is not None:
        samples = prepared.samples
    else:
        samples = index_samples(cases, classes=a.classes, min_voxels=a.min_voxels)
    if not samples:
        raise DistillUsageError("no samples: every label is empty or filtered out")
    model = load_spec(a.model, device, config=a.model_config, **parse_overrides(a.model_override))
    results: dict[str, list] = {}
    if "crop" in a.grids:
        ds = (
            prepared
            if prepared is not None
            else CropDataset(cases, samples, anchor=a.lattice_anchor)
        )
        results["crop"] = evaluate_crops(
            model, ds, a.clicks, device, protocol=a.protocol, seed=a.seed
        )
    if "original" in a.grids:
        results["original"] = evaluate_volumes(
            model,
            cases,
            samples,
            a.clicks,
            device,
            lattice_anchor=a.lattice_anchor,
            protocol=a.protocol,
            seed=a.seed,
        )
    path = write_report(results, a.out)
    for grid, recs in results.items():
        s = summarise(recs)["overall"]
        print(f"{grid:9s} final {s['final']}  best {s['best']}")
    print(f"protocol {a.protocol}; wrote {path} and {Path(a.out) / 'evaluation.png'}")
    return 0
