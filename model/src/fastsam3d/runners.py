"""Which runner a :class:`fastsam3d.Session` uses, and the array operations that go with it.

A PyTorch runner (:class:`fastsam3d.fastpath.Runner`) holds tensors on its device
(:class:`fastsam3d.geometry.TorchOps`); a torch-free runner (``array_backend = "numpy"``,
:func:`fastsam3d.onnx.torch_free_runner`) holds numpy arrays
(:class:`fastsam3d.resample_numpy.NumpyOps`). PyTorch is imported only for the former.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

from ._optional import require_torch

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["runner_and_ops"]


def _load_model(model: Any, device: torch.device) -> nn.Module:
    from torch import nn

    if isinstance(model, nn.Module):
        return model.to(device)
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_model

        return load_model(model, device=device)
    raise TypeError(
        f"model must be a registry name, a checkpoint path or an nn.Module, "
        f"not {type(model).__name__}"
    )


def runner_and_ops(model: Any, device: Any, precision: str) -> tuple[Any, Any]:
    """The runner for ``model`` and the array operations that go with it (see the module
    docstring): a torch-free runner is used as it is; without PyTorch a checkpoint path gets
    one; anything else needs PyTorch (an ImportError naming the extra to install)."""
    if getattr(model, "array_backend", None) == "numpy":
        from .resample_numpy import NumpyOps

        return model, NumpyOps()
    try:
        require_torch("a fastsam3d.Session on a PyTorch model")
    except ImportError:
        path = _checkpoint_file(model)
        if path is None or importlib.util.find_spec("onnxruntime") is None:
            raise
        from .onnx import torch_free_runner

        return runner_and_ops(torch_free_runner(path, precision=precision), device, precision)
    from .device import resolve_device
    from .fastpath import Runner
    from .geometry import TorchOps

    if isinstance(model, Runner):
        runner = model
    else:
        dev = resolve_device(device)
        runner = Runner(_load_model(model, dev), dev, precision=precision)
    return runner, TorchOps(runner.device)


def _checkpoint_file(model: Any) -> str | None:
    """A checkpoint path, or a downloaded registry entry's file, for the torch-free runner."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    if os.path.isfile(model):
        return os.fspath(model)
    from .hub import HubError, cached_path

    try:
        path = cached_path(os.fspath(model))
    except (HubError, ValueError, KeyError):
        return None
    return None if path is None else str(path)
