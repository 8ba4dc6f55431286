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
        if not isinstance(model, (str, os.PathLike)):
            raise
        if importlib.util.find_spec("onnxruntime") is None:
            raise
        from .onnx import torch_free_runner

        path, config = _checkpoint_file(model)
        runner = torch_free_runner(path, config=config, precision=precision)
        return runner_and_ops(runner, device, precision)
    from .device import resolve_device
    from .fastpath import Runner
    from .geometry import TorchOps

    if isinstance(model, Runner):
        runner = model
    else:
        dev = resolve_device(device)
        runner = Runner(_load_model(model, dev), dev, precision=precision)
    return runner, TorchOps(runner.device)


def _checkpoint_file(model: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(file, registry config or None) for the torch-free runner, by ``load_model``'s rule: a
    registered name always means its verified cache entry (downloaded on first use) and runs as
    its config, even when a file of that name is in the working directory."""
    from .weights import WEIGHTS

    if isinstance(model, str) and model in WEIGHTS:
        from .hub import download

        return str(download(model)), WEIGHTS[model].config
    return os.fspath(model), None
