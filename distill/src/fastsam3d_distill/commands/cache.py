"""`fastsam3d-distill cache`: run the teacher once and store its targets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..distributed import init_distributed
from ..models import parse_overrides
from ..recipes import apply_preset
from ._common import (
    _add_data,
    _add_teacher,
    _dataset,
    _teacher,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="run the teacher once and store its targets")
    _add_teacher(p)
    _add_data(p, augment_default=False)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--student-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="only depth matters: which teacher blocks to keep",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="teacher precision (auto: bf16 on CUDA, fp32 on CPU, as online distillation runs it)",
    )
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..stage1 import cache_manifest, cache_teacher_features, needed_teacher_taps

    apply_preset(a)
    env = init_distributed(a.device)
    a.augment = False  # cached targets are only valid for the crops the teacher saw
    ds = _dataset(a, Path(a.out), labels=False)  # data errors before the teacher loads
    teacher = _teacher(a, env.device).image_encoder
    s_depth = int(parse_overrides(a.student_override).get("depth", 6))
    taps = needed_teacher_taps(s_depth, len(teacher.blocks))
    bf16 = a.precision == "bf16" or (a.precision == "auto" and env.device.type == "cuda")
    manifest = cache_manifest(a, ds, taps, len(teacher.blocks), bf16)
    cache_teacher_features(
        teacher,
        ds,
        a.out,
        taps,
        device=env.device,
        batch_size=a.batch_size,
        bf16=bf16,
        rank=env.rank,
        world=env.world,
        manifest=manifest,
    )
    if env.is_main:
        print(f"cached teacher features of {len(ds)} samples in {a.out}")
    return 0
