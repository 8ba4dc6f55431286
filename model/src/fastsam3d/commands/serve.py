"""``fastsam3d serve``: the model on one device, many users over HTTP (docs/serve.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import CommandError, UsageError

API_KEY_ENV = "FASTSAM3D_API_KEY"
MIN_KEY_LENGTH = 16


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve interactive segmentation to many users over HTTP (one process per GPU)",
        description=(
            "Hold the model on one device and serve sessions over HTTP (FastAPI; OpenAPI at "
            "/docs). Clients: fastsam3d.RemoteSession, `fastsam3d segment --server URL`, the "
            "Slicer module. Off loopback an API key is required; put TLS in front with a "
            "reverse proxy (docs/serve.md). Needs: pip install 'fastsam3d[serve]'."
        ),
    )
    p.add_argument(
        "--model",
        default="fastsam3d",
        help="registered weights name or a checkpoint file (default fastsam3d)",
    )
    p.add_argument(
        "--fixture-weights",
        action="store_true",
        help="deterministic untrained weights (tests, load tests: NOT segmentations)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cuda, cuda:1, mps, cpu")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="the Runner's precision (default auto: the fast path)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; anything else needs a key)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        help=f"the API key (visible in the process list: prefer --api-key-file or ${API_KEY_ENV})",
    )
    p.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=32,
        help="most open sessions (default 32); more get HTTP 503",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="close sessions without requests for this long (default 1800)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=1024.0,
        help="largest volume, uncompressed, in MB (default 1024); larger get 413",
    )
    p.add_argument(
        "--max-crops", type=int, default=8, help="most 128^3 crops a session may use (default 8)"
    )
    p.add_argument(
        "--instance",
        default="",
        help="prefix of session ids, e.g. gpu0: a load balancer routes by it (docs/serve.md)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/Ctrl-C, wait this long for requests in flight (default 30)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    p.set_defaults(func=run)
    return p


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume reachable


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or the environment; checked, never logged."""
    given = [x for x in (args.api_key, args.api_key_file) if x]
    if len(given) > 1:
        raise UsageError("give the key either with --api-key or with --api-key-file, not both")
    key = args.api_key
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise UsageError(f"--api-key-file: no such file {path}")
        key = path.read_text().strip()
    if key is None:
        key = os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < MIN_KEY_LENGTH:
        raise UsageError(
            f"the API key has {len(key)} characters; use at least "
            f'{MIN_KEY_LENGTH}, e.g. python -c "import secrets; '
            f'print(secrets.token_urlsafe(32))"'
        )
    if key is None and not is_loopback(args.host):
        raise UsageError(
            f"refusing to listen on {args.host} without an API key: anyone who "
            f"can reach it could use the GPU and see the images. Give "
            f"--api-key-file PATH (or ${API_KEY_ENV}), or listen on 127.0.0.1"
        )
    return key


def _model(args: argparse.Namespace, log: Any) -> tuple[Any, str]:
    """(model, its name for clients): the same loading rules as ``fastsam3d segment``."""
    from .segment import load_network

    ns = argparse.Namespace(
        model=args.model,
        checkpoint=None,
        fixture_weights=args.fixture_weights,
        quiet=False,
        backend="torch",  # the server batches clicks on one torch Runner
    )
    from fastsam3d.weights import WEIGHTS

    # a registered name means the registry entry even beside a file of that name (load_model's rule)
    if not args.fixture_weights and args.model not in WEIGHTS and Path(args.model).is_file():
        ns.checkpoint, ns.model = args.model, "checkpoint"
    name = Path(args.model).name if ns.checkpoint else args.model
    return load_network(ns, log), name + (" (fixture weights)" if args.fixture_weights else "")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    key = resolve_api_key(args)
    for flag, value in (("--max-sessions", args.max_sessions), ("--max-crops", args.max_crops)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1")
    if args.idle_timeout <= 0 or args.max_upload_mb <= 0:
        raise UsageError("--idle-timeout and --max-upload-mb must be positive")
    try:
        import uvicorn

        from fastsam3d.serve import ServerConfig, create_app
    except ImportError as e:
        raise UsageError(
            f"the server needs the 'serve' extra ({e.name} is missing): "
            "pip install 'fastsam3d[serve]'"
        ) from None
    from fastsam3d.device import resolve_device
    from fastsam3d.fastpath import Runner

    device = resolve_device(args.device)
    try:
        model, name = _model(args, log)
    except CommandError as e:  # no weights: a usage error for the server
        raise UsageError(str(e)) from None
    runner = Runner(model, device, precision=args.precision)
    config = ServerConfig(
        model_name=name,
        api_key=key,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        max_upload_mb=args.max_upload_mb,
        max_crops=args.max_crops,
        instance=args.instance,
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log(
        f"serving {name} on {device} at http://{args.host}:{args.port} "
        f"({'API key required' if key else 'no API key: loopback only'})"
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runner, config),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_keep_alive=75,
            timeout_graceful_shutdown=int(args.drain_timeout),
        )
    )
    server.run()
    return 0
