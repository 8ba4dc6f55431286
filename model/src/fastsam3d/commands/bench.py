"""``fastsam3d bench``: time the reference's way against our exact and fast paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="benchmark encoder, click and session: reference way vs exact vs fast path",
        description="Times the public code's way (einsum attention, fp32, eager) against our "
        "exact fp32 and fast paths on fixture weights (speed does not depend on weight values): "
        "encoders, one click, click + paste, first mask and further click of a session on a "
        "512x512x300 CT-sized volume, batch encoder throughput, peak GPU memory.",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument(
        "--models",
        default="fastsam3d,sam-med3d-turbo",
        help="comma-separated registry names; the first one is used for the click "
        "and session stages",
    )
    p.add_argument(
        "--modes",
        default="reference,exact,fast",
        help="comma-separated: reference, exact, fast, fast-compile",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=100,
        help="timed runs per stage, median reported (default 100)",
    )
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed runs before each stage (default 10)"
    )
    p.add_argument(
        "--batch", type=int, default=8, help="batch size of the throughput stage (0 = skip)"
    )
    p.add_argument("--no-session", action="store_true", help="skip the session stages")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="2-block encoder and a small volume: a quick smoke test, not a measurement",
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import bench

    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = [m for m in modes if m not in bench.ALL_MODES]
    if unknown:
        raise UsageError(f"unknown mode(s) {unknown}; choose from {list(bench.ALL_MODES)}")
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    out = bench.run(
        models=tuple(m for m in args.models.split(",") if m),
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        modes=modes,
        batch=args.batch,
        session=not args.no_session,
        tiny=args.tiny,
    )
    env = out["environment"]
    print(
        f"# fastsam3d bench — {env['date']} commit {env['commit']} torch {env['torch']} "
        f"on {env.get('gpu', env['device'])} ({env['threads']} threads)"
    )
    print(bench.format_table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
