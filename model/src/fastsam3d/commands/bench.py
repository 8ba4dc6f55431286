"""``fastsam3d bench``: time the reference's way against our exact and fast paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="benchmark encoder and click: reference way vs exact vs fast path",
        description="Times the public code's way (einsum attention, fp32, eager) against our "
        "exact fp32 and fast paths on fixture weights (speed does not depend on weight values).",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument("--models", default="fastsam3d,sam-med3d-turbo",
                   help="comma-separated registry names")
    p.add_argument("--modes", default="reference,exact,fast")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per stage (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import bench

    out = bench.run(
        models=tuple(m for m in args.models.split(",") if m),
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        modes=tuple(m for m in args.modes.split(",") if m),
    )
    env = out["environment"]
    print(f"# fastsam3d bench — {env['date']} commit {env['commit']} torch {env['torch']} "
          f"on {env.get('gpu', env['device'])} ({env['threads']} threads)")
    print(bench.format_table(out["results"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
