"""Training state on disk: atomic checkpoint writes, reading a checkpoint back (weights-only
unpickling), and the global RNG states that make a resumed run bit-identical.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsam3d.atomic import atomic_path

CKPT_FORMAT = "fastsam3d-distill-train/1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save that never leaves a half-written checkpoint (fastsam3d's atomic write)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint this engine wrote (weights-only unpickling: no code runs)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # e.g. an exported model.pth (it pickles its args)
        ckpt = None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(
            f"{path} is not a fastsam3d-distill training checkpoint (use `fastsam3d-distill "
            "export` output with fastsam3d.load_model instead)"
        )
    return ckpt


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state_to_plain(random.getstate()),
    }


def _py_state_to_plain(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
