"""ONNX export (needs torch) and the ONNX Runtime engine (numpy + onnxruntime only).

``fastsam3d.onnx.export`` writes the graphs; ``fastsam3d.onnx.engine`` runs them without
PyTorch, and :func:`torch_free_runner` (``fastsam3d.onnx.runner``) turns a checkpoint file into
a runner that :class:`fastsam3d.Session` accepts, so that a whole session runs without PyTorch.
Nothing is imported here until used, so importing this package never pulls in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TORCH_FREE_SESSION", "torch_free_runner"]

#: A ``fastsam3d.Session`` runs on ONNX Runtime without PyTorch (the Slicer module reads this).
TORCH_FREE_SESSION = True


def torch_free_runner(path: Any, **options: Any) -> Any:
    """:func:`fastsam3d.onnx.runner.torch_free_runner` (imported on first use)."""
    from .runner import torch_free_runner as make

    return make(path, **options)
