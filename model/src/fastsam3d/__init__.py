"""fastsam3d: checkpoint-exact FastSAM3D / SAM-Med3D networks and an interactive 3D session."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Everything imports lazily: `import fastsam3d` costs nothing, and the torch-free parts
# (fastsam3d.weights: the weights registry; fastsam3d.hub: cache and downloads) work before
# torch is installed, which the Slicer module needs on first start.
_LAZY = {
    "ModelConfig": "configs",
    "build_model": "build",
    "get_config": "configs",
    "list_configs": "configs",
    "list_models": "configs",  # deprecated: list_configs
    "WeightsInfo": "weights",
    "get_weights": "weights",
    "list_weights": "weights",
    "set_attention_backend": "build",
    "load_model": "checkpoint",
    "Volume": "volume",
    "Session": "session",
    "Result": "result",
    "SessionError": "result",
    "paste_result": "result",
    "RemoteSession": "remote",
    "RemoteError": "remote",
    "RemoteEngine": "remote",
    "VolumeError": "errors",
    "SparsePattern": "modeling.sparse_attention",
    "Runner": "fastpath",
    "resolve_device": "device",
    "FastSAM3DError": "errors",
    "CommandError": "errors",
    "UsageError": "errors",
    "CheckpointError": "_sniff",
    "CheckpointReadError": "pth_reader",
    "HubError": "errors",
    "DownloadError": "errors",
    "ChecksumError": "errors",
    "DownloadCancelled": "errors",
    "PromptError": "prompts",
    "WireError": "wire",
    "SessionExpiredError": "remote",
    "TORCH_REQUIREMENT": "_requirements",
}

__all__ = ["__version__", *_LAZY]


# Submodules reachable as attributes after a plain `import fastsam3d` (fastsam3d.hub.download,
# fastsam3d.checkpoint.save_official, fastsam3d.testing.fixture_model ...), imported on first use.
_SUBMODULES = (
    "atomic",
    "bench",
    "build",
    "checkpoint",
    "configs",
    "dicom",
    "fastpath",
    "geometry",
    "hub",
    "device",
    "errors",
    "modeling",
    "nifti",
    "preview",
    "prompts",
    "session",
    "testing",
    "volume",
    "weights",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(f".{_LAZY[name]}", __name__)
        except ModuleNotFoundError as exc:  # torch is the `torch` extra: say so
            from ._optional import TORCH_HINT, missing_torch

            if not missing_torch(exc):
                raise
            msg = f"fastsam3d.{name} needs PyTorch, which is not installed: {TORCH_HINT}"
            raise ModuleNotFoundError(msg, name="torch") from None
        return getattr(module, name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastsam3d' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
