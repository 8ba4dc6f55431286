"""`fastsam3d-distill finetune`: stage 2: prompt encoder + decoder with simulated clicks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..distributed import init_distributed
from ..engine import Trainer
from ..models import load_spec, parse_overrides
from ..recipes import apply_recipe
from ._common import (
    _add_data,
    _add_train,
    _dataset,
    _plain,
    _train_config,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("finetune", help="stage 2: prompt encoder + decoder with simulated clicks")
    p.add_argument("--model", required=True, help="full model (e.g. <distill out>/student.pth)")
    p.add_argument("--model-config", default=None, help="config name overriding detection")
    p.add_argument("--model-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--recipe",
        choices=["released", "paper", "ours"],
        default="released",
        help="defaults for the click options below (docs/distill.md)",
    )
    p.add_argument(
        "--clicks", type=int, default=None, help="click rounds per sample (released: 11)"
    )
    p.add_argument(
        "--click-rule",
        choices=["released", "ours"],
        default=None,
        help="released: uniform voxel of FN∪FP; ours: inner half of the largest error component",
    )
    p.add_argument(
        "--mask-only-rounds",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="released: a random round in [2,8] and the last get no click",
    )
    p.add_argument(
        "--mask-only-draw",
        choices=["batch", "sample"],
        default="batch",
        help="draw the random mask-only round once per optimiser step (batch, as released: "
        "one decoder pass per round) or per sample (two passes where samples differ)",
    )
    p.add_argument(
        "--detach-prev",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cut the gradient through the fed-back logits (released: no)",
    )
    p.add_argument(
        "--loss-reduction",
        choices=["sum", "mean"],
        default=None,
        help="over rounds (released: sum)",
    )
    p.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        default=None,
        help="epochs where the LR drops x0.1 (released: 60 90)",
    )
    p.add_argument(
        "--intensity-jitter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add intensity scale/shift to the flips (released: flips only)",
    )
    p.add_argument(
        "--policy",
        choices=["newest", "accumulate"],
        default=None,
        help="how clicks reach the decoder (default: the model config's)",
    )
    p.add_argument(
        "--box-prob",
        type=float,
        default=0.0,
        help="share of batches prompted with the box too (trains box embeddings)",
    )
    _add_data(p, augment_default=True)
    _add_train(p, lr=8e-5)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..export import export_model
    from ..stage2 import FinetuneTask

    chosen = apply_recipe(a, "finetune")
    cfg = _train_config(a, "finetune")
    env = init_distributed(cfg.device)
    out = Path(a.out)
    torch.manual_seed(a.seed)
    ds = _dataset(a, out, labels=True)  # data errors before the model loads
    if env.is_main:
        print(f"[finetune] recipe {a.recipe}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    model = load_spec(a.model, config=a.model_config, **parse_overrides(a.model_override))
    if a.box_prob > 0 and not model.prompt_encoder.supports_boxes:
        import fastsam3d

        box_model = fastsam3d.build_model(model.config, num_point_embeddings=4)
        missing, unexpected = box_model.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all("point_embeddings" in k for k in missing), missing
        model = box_model
        if env.is_main:
            print("[finetune] added box embeddings (point_embeddings.2/.3), newly initialised")
    model.train()
    task = FinetuneTask(
        model,
        n_clicks=a.clicks,
        policy=a.policy,
        box_prob=a.box_prob,
        seed=a.seed,
        clicks=a.click_rule,
        mask_only_rounds=a.mask_only_rounds,
        mask_only_draw=a.mask_only_draw,
        detach_prev=a.detach_prev,
        reduction=a.loss_reduction,
        lr_milestones=tuple(a.lr_milestones),
    )
    result = Trainer(task, ds, cfg, env).fit()
    if env.is_main:
        paths = export_model(model.eval(), out / "model.pth", stage="finetune")
        print(json.dumps(_plain(result), indent=1))
        print(f"[finetune] exported {', '.join(map(str, paths))}")
    return 0
