"""`fastsam3d-distill export`: training checkpoint -> official .pth + .safetensors."""

from __future__ import annotations

import argparse
from typing import Any

from ..models import load_spec, parse_overrides


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="training checkpoint -> official .pth + .safetensors")
    p.add_argument("--checkpoint", required=True, help="<run>/last.pt or final.pt")
    p.add_argument(
        "--base",
        required=True,
        help="after distill: the teacher (decoder source); after finetune: the "
        "model it started from (encoder source)",
    )
    p.add_argument("--base-config", default=None, help="config name for a --base checkpoint")
    p.add_argument(
        "--base-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for fixture:/random: bases (tests)",
    )
    p.add_argument("--out", required=True, help="output .pth")
    p.add_argument("--safetensors", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..export import export_model, model_from_training_checkpoint

    base = load_spec(a.base, config=a.base_config, **parse_overrides(a.base_override))
    model = model_from_training_checkpoint(a.checkpoint, base)
    paths = export_model(model, a.out, safetensors=a.safetensors)
    print(f"exported {', '.join(map(str, paths))}")
    return 0
