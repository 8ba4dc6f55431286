"""`fastsam3d-distill distill`: stage 1: layer-wise progressive encoder distillation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..distributed import init_distributed
from ..engine import Trainer
from ..errors import DistillUsageError
from ..models import parse_overrides
from ..recipes import apply_preset, apply_recipe
from ._common import (
    _add_data,
    _add_teacher,
    _add_train,
    _dataset,
    _plain,
    _teacher,
    _train_config,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("distill", help="stage 1: layer-wise progressive encoder distillation")
    _add_teacher(p)
    p.add_argument("--student", default="fastsam3d", help="student config name")
    p.add_argument("--student-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--recipe",
        choices=["released", "paper", "ours"],
        default="released",
        help="defaults for --loss/--init/--grad-clip/--neck-weight (docs/distill.md)",
    )
    p.add_argument(
        "--init",
        choices=["teacher", "random"],
        default=None,
        help="student initialisation (released/paper: random; ours: from the "
        "teacher, a warm start)",
    )
    p.add_argument(
        "--loss",
        choices=["paper", "paper-mse", "neck", "released-tap"],
        default=None,
        help="paper: (1/k) sum ||t_2i - s_i|| as printed; paper-mse "
        "(ours): mean MSE over k pairs + neck; neck: released HEAD; released-tap",
    )
    p.add_argument(
        "--neck-weight",
        type=float,
        default=None,
        help="weight of the neck MSE added by --loss paper-mse (ours: 1)",
    )
    p.add_argument(
        "--k-every-epochs",
        type=int,
        default=3,
        help="progressive schedule: one more matched block every N epochs",
    )
    p.add_argument("--k-every-steps", type=int, default=0, help="... or every N optimiser steps")
    p.add_argument("--cache", help="feature cache folder written by `cache` (else online)")
    p.add_argument("--cache-in-memory", action="store_true", help="read the whole cache once")
    _add_data(p, augment_default=False)
    _add_train(p, lr=8e-4)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import fastsam3d

    from ..export import assemble_student, export_model
    from ..stage1 import (
        CachedFeatureDataset,
        DistillTask,
        init_student_from_teacher,
        teacher_identity,
    )

    apply_preset(a)
    chosen = apply_recipe(a, "distill")
    cfg = _train_config(a, "distill")
    env = init_distributed(cfg.device)
    out = Path(a.out)
    torch.manual_seed(a.seed)
    if a.cache:
        ds = CachedFeatureDataset(a.cache, preload=a.cache_in_memory)
        ds.check_teacher(teacher_identity(a))
    else:
        ds = _dataset(a, out, labels=False)  # data errors before the teacher loads
    teacher = _teacher(a)
    s_cfg = fastsam3d.get_config(a.student, **parse_overrides(a.student_override))
    student = fastsam3d.build_model(s_cfg).image_encoder.train()
    if env.is_main:
        print(f"[distill] recipe {a.recipe}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    if a.init == "teacher":
        copied = init_student_from_teacher(student, teacher.image_encoder)
        if env.is_main:
            print(f"[distill] student initialised from the teacher: {len(copied)} tensors")
    common = dict(
        loss=a.loss,
        k_every_epochs=a.k_every_epochs,
        k_every_steps=a.k_every_steps,
        neck_weight=a.neck_weight,
        student_config=s_cfg,
    )
    if a.cache:
        task = DistillTask(student, None, teacher_depth=ds.meta["teacher_depth"], **common)
        if ds.teacher_taps != task.teacher_taps:
            raise DistillUsageError(
                f"cache {a.cache} holds teacher blocks {ds.teacher_taps}, this "
                f"student needs {task.teacher_taps}: re-run `cache`"
            )
    else:
        task = DistillTask(student, teacher.image_encoder, **common)
    result = Trainer(task, ds, cfg, env).fit()
    if env.is_main:
        model = assemble_student(task.student, s_cfg, teacher)
        paths = export_model(model, out / "student.pth", stage="distill")
        print(json.dumps(_plain(result), indent=1))
        print(f"[distill] student with the teacher's decoder: {', '.join(map(str, paths))}")
    return 0
