"""fastsam3d-distill: one subcommand per stage.

    fastsam3d-distill synth     --out data/Dataset001 --cases 8
    fastsam3d-distill prepare   --data data/Dataset001 --out data/prep001   (then --prepared)
    fastsam3d-distill cache     --teacher sam_med3d_turbo.pth --data data/Dataset001 --out feats
    fastsam3d-distill distill   --teacher sam_med3d_turbo.pth --data data/Dataset001 --out runs/s1
    fastsam3d-distill finetune  --model runs/s1/student.pth --data data/Dataset001 --out runs/s2
    fastsam3d-distill evaluate  --model runs/s2/model.pth --data data/Dataset002 --out runs/eval
    fastsam3d-distill export    --checkpoint runs/s2/last.pt --base runs/s1/student.pth --out m.pth

Training subcommands run under `torchrun --nproc_per_node N` unchanged (DDP) and resume from
<out>/last.pt when it exists.
"""

from __future__ import annotations

import argparse
import sys

from fastsam3d.errors import FastSAM3DError

from .commands import cache, distill, evaluate, export, finetune, prepare, synth
from .errors import DistillError

# In the order `--help` lists them: the workflow's order.
COMMANDS = (synth, prepare, cache, distill, finetune, evaluate, export)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastsam3d-distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


# Input problems (exit status 2, one line on stderr); anything else is a bug and keeps its
# traceback. fastsam3d's own input errors (VolumeError, CheckpointError...) are included.
USER_ERRORS = (
    DistillError,
    FastSAM3DError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run one command: the one place that maps errors to stderr and exit statuses."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # checkpoints are atomic: the last complete one is kept
        print(f"fastsam3d-distill {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:  # a problem with the input: one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fastsam3d-distill {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
