"""The ``fastsam3d`` console command.

Commands raise; :func:`main` alone turns an error into one message on stderr
(``fastsam3d COMMAND: ...``) and an exit status: 2 for a usage error (:class:`UsageError`, as
argparse's own, or PyTorch missing), 1 for bad input, checkpoints, downloads and servers (any
:class:`fastsam3d.FastSAM3DError`, ``ValueError`` or ``OSError``), a :class:`CommandError`'s own
code (``segment``: 3 without weights), 130 on Ctrl-C. Anything else is a bug: one line naming
the exception type (``FASTSAM3D_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from . import __version__
from ._optional import TORCH_HINT, missing_torch
from .commands import COMMANDS
from .errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    FastSAM3DError,
    UsageError,
)

# An OSError while writing: every output goes through fastsam3d.atomic, so say what that kept.
_WRITE_NOTE = (
    "outputs are renamed into place only when complete: no existing file was "
    "replaced by a partial one"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsam3d",
        description="Interactive 3D segmentation with FastSAM3D / SAM-Med3D.",
    )
    parser.add_argument("--version", action="version", version=f"fastsam3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def exit_status(exc: BaseException) -> tuple[int, str]:
    """(exit status, message) for an error a command raised: the one mapping of the CLI."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, CommandError):
        return exc.code, str(exc)
    if missing_torch(exc):  # convert, export-onnx, bench, serve on a `fastsam3d[onnx]` install
        if TORCH_HINT in str(exc):  # fastsam3d._optional.require_torch named the feature
            return EXIT_USAGE, str(exc)
        return EXIT_USAGE, f"this command needs PyTorch, which is not installed: {TORCH_HINT}"
    if isinstance(exc, (FastSAM3DError, ValueError, FileNotFoundError)):
        return EXIT_ERROR, str(exc)
    if isinstance(exc, OSError):
        return EXIT_ERROR, f"{exc} ({_WRITE_NOTE})"
    return EXIT_ERROR, f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors go to stderr as one message, the status is returned."""
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """``args.func(args)`` with the CLI's error mapping (:func:`exit_status`) applied."""
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `fastsam3d info | head`: the reader left; that is not an error of the command, and
        # Python's flush at exit must not report it either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyboardInterrupt, Exception) as exc:
        expected = isinstance(exc, (KeyboardInterrupt, FastSAM3DError, ValueError, OSError))
        if not expected and os.environ.get("FASTSAM3D_DEBUG"):
            raise
        code, message = exit_status(exc)
        print(f"fastsam3d {args.command}: {message}", file=sys.stderr)
        return code


__all__ = [
    "main",
    "build_parser",
    "run_command",
    "exit_status",
    "CommandError",
    "UsageError",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
]


if __name__ == "__main__":
    sys.exit(main())
