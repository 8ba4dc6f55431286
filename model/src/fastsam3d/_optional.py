"""What to install when a feature's optional dependency is missing: one message per extra.

fastsam3d's core (``pip install fastsam3d``) is numpy + tqdm. PyTorch is the ``torch`` extra:
the exact and fast engines, ``load_model``, export, serving and distillation need it. The
``onnx`` extra (ONNX Runtime) segments without it (:func:`fastsam3d.onnx.torch_free_runner`).
Nothing here imports torch unless asked to; Python 3.9-safe (the Slicer module imports it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["TORCH_HINT", "missing_torch", "require_torch"]

TORCH_HINT = (
    'install PyTorch with `pip install "fastsam3d[torch]"` (a CUDA build: see pytorch.org), '
    'or segment without it on ONNX Runtime: `pip install "fastsam3d[onnx]"` and '
    "fastsam3d.Session(<checkpoint path>) or fastsam3d.onnx.torch_free_runner(<checkpoint path>)"
)


def missing_torch(exc: BaseException) -> bool:
    """Whether ``exc`` is the ImportError of PyTorch itself not being installed."""
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "torch"


def require_torch(feature: str) -> ModuleType:
    """``torch``, or an ImportError saying that ``feature`` needs it and what to install."""
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as exc:
        if not missing_torch(exc):
            raise
        raise ModuleNotFoundError(
            f"{feature} needs PyTorch, which is not installed: {TORCH_HINT}", name="torch"
        ) from None
