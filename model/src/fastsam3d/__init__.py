"""fastsam3d: checkpoint-exact FastSAM3D / SAM-Med3D networks and an interactive 3D session."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .build import ModelConfig, build_model, get_config, list_models, set_attention_backend

__version__ = "0.1.0"

# Heavier parts import lazily so that `import fastsam3d` stays cheap (the Slicer module imports
# it at first use, the CLI for `info`).
_LAZY = {
    "load_model": "checkpoint",
    "Volume": "volume",
    "Session": "session",
    "paste_result": "session",
    "SparsePattern": "modeling.sparse_attention",
}

__all__ = [
    "ModelConfig", "Session", "SparsePattern", "Volume", "__version__", "build_model", "get_config",
    "list_models", "load_model", "paste_result", "set_attention_backend",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastsam3d' has no attribute {name!r}")
