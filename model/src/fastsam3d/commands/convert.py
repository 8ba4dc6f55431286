"""``fastsam3d convert``: read any supported checkpoint; write safetensors or the official form."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import same_file
from ..errors import CommandError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint to safetensors (no pickle) or the official .pth layout",
        description="Loads CHECKPOINT safely (never executing code), checks it against the "
        "network, and writes OUT: .safetensors, or the official {'model_state_dict', 'args'} "
        "container for any other suffix.",
    )
    p.add_argument("checkpoint", help="checkpoint path or registered weights name")
    p.add_argument("out", type=Path, help="file to write (.safetensors or .pth)")
    p.add_argument("--decoder", help="prompt encoder + decoder file for an encoder-only checkpoint")
    p.add_argument("--config", help="registry config (default: detected from the file)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model, save_official, save_safetensors

    inputs = [Path(p) for p in (args.checkpoint, args.decoder) if p]
    if any(same_file(args.out, p) for p in inputs):
        raise CommandError("refusing to overwrite an input checkpoint; choose another output path")
    if args.out.is_dir():
        raise CommandError(f"{args.out} is a directory; give the output file's name")
    model = load_model(args.checkpoint, config=args.config, decoder=args.decoder)
    writer = save_safetensors if args.out.suffix == ".safetensors" else save_official
    try:
        writer(model, args.out)
    except OSError as exc:
        raise CommandError(
            f"cannot write {args.out} ({exc.strerror or exc}); nothing was changed"
        ) from exc
    print(f"{model.config.summary()}\nwrote {args.out}")
    return 0
