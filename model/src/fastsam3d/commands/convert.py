"""``fastsam3d convert``: read any supported checkpoint; write safetensors or the official form."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint to safetensors (no pickle) or the official .pth layout",
        description="Loads CHECKPOINT safely (never executing code), checks it against the "
        "network, and writes OUT: .safetensors, or the official {'model_state_dict', 'args'} "
        "container for any other suffix.",
    )
    p.add_argument("checkpoint", help="checkpoint path or registered weights name")
    p.add_argument("out", type=Path)
    p.add_argument("--decoder", help="prompt encoder + decoder file for an encoder-only checkpoint")
    p.add_argument("--config", help="registry config (default: detected from the file)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, load_model, save_official, save_safetensors

    try:
        model = load_model(args.checkpoint, config=args.config, decoder=args.decoder)
    except CheckpointError as exc:
        print(f"error: {exc}")
        return 1
    if args.out.resolve() == Path(args.checkpoint).resolve():
        print("error: refusing to overwrite the input checkpoint; choose another output path")
        return 1
    writer = save_safetensors if args.out.suffix == ".safetensors" else save_official
    writer(model, args.out)
    print(f"{model.config.summary()}\nwrote {args.out}")
    return 0
