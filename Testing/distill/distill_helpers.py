"""Tiny configs and CLI helpers for the distill tests (imported by the test modules).

The 128³ input geometry is fixed by the position embedding (8³ tokens of 16³ patches); only
depth and width shrink, through fastsam3d's config overrides (never a copy of the network).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TEACHER = "fixture:sam-med3d-turbo-fastsam3d-block"
# out_chans=48 shrinks the neck's 3x3x3 conv (2 GMAC at 384 channels) and the decoder; the
# export test keeps 384 because fastsam3d.load_model detects configs with the real decoder.
TEACHER_OVERRIDES = [
    "depth=4",
    "embed_dim=32",
    "num_heads=2",
    "window_size=0",
    "global_attn_indexes=",
    "out_chans=48",
]
STUDENT_OVERRIDES = [
    "depth=2",
    "embed_dim=32",
    "num_heads=2",
    "num_attn_free_blocks=1",
    "out_chans=48",
]
TINY_STUDENT = dict(depth=2, embed_dim=32, num_heads=2, num_attn_free_blocks=1, out_chans=48)
TINY_TEACHER = dict(
    depth=4, embed_dim=32, num_heads=2, window_size=0, global_attn_indexes=(), out_chans=48
)


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: both source trees importable, 1 thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "model/src"), str(REPO / "distill/src"), env.get("PYTHONPATH", "")]
    )
    env["OMP_NUM_THREADS"] = "1"
    return env


def distill_cli_args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastsam3d_distill.cli",
        "distill",
        "--teacher",
        TEACHER,
        "--teacher-override",
        *TEACHER_OVERRIDES,
        "--student-override",
        *STUDENT_OVERRIDES,
        "--out",
        str(out),
        "--no-progress",
        "--no-tensorboard",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *extra,
    ]
