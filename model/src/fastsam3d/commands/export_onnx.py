"""``fastsam3d export-onnx``: the encoder and the click as ONNX graphs (+ the int8 encoder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CommandError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export-onnx",
        help="export the encoder and the click (prompt encoder + decoder) to ONNX",
        description="Writes OUT_DIR/encoder.onnx (128^3 crop -> embedding), OUT_DIR/click.onnx "
        "(embedding + points + mask prompt -> low-res logits and IoUs of all mask tokens), "
        "OUT_DIR/encoder.int8.onnx (ONNX Runtime dynamic int8 quantisation of the encoder) and "
        "fastsam3d-onnx.json. Run them with `Runner(..., backend='onnxruntime', onnx_dir=OUT_DIR)` "
        "or fastsam3d.onnx.engine.OrtEngine (no PyTorch needed). Needs onnx, onnxscript and "
        "onnxruntime (pip install 'fastsam3d[onnx-export]').",
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        default="fastsam3d",
        help="checkpoint path or registered weights name (default fastsam3d)",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--decoder", help="prompt encoder + decoder file for an encoder-only checkpoint")
    p.add_argument("--config", help="registry config (default: detected from the file)")
    p.add_argument(
        "--fixture-weights",
        action="store_true",
        help="export the deterministic untrained fixture network of --config "
        "(default fastsam3d) instead of a checkpoint (offline pipeline check)",
    )
    p.add_argument("--no-int8", action="store_true", help="skip the int8 encoder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace graphs of other weights already in OUT_DIR",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model
    from ..quantize import exporter_available

    if not exporter_available():
        raise CommandError(
            "ONNX export needs onnx, onnxscript and onnxruntime: "
            "pip install 'fastsam3d[onnx-export]'"
        )
    from ..onnx.export import export_onnx

    if args.fixture_weights:
        from ..testing import fixture_model

        model = fixture_model(args.config or "fastsam3d")
    else:
        model = load_model(args.checkpoint, config=args.config, decoder=args.decoder)
    paths = export_onnx(model, args.out_dir, int8=not args.no_int8, overwrite=args.overwrite)
    print(model.config.summary())
    for p in paths.values():
        print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    return 0
