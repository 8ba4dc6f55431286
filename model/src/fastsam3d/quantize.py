"""The int8 CPU path: the encoder's Linear layers (and its patch embedding, exported as a GEMM)
dynamically quantised by ONNX Runtime, and the rule that picks it.

Why ONNX Runtime: PyTorch's eager quantization (``torch.ao.quantization.quantize_dynamic``)
warns that it is deprecated and will be removed, while ONNX Runtime's ``quantize_dynamic`` is
maintained and its int8 GEMMs use VNNI / AMX-INT8 where present and AVX2 otherwise.

The rule (``Runner(precision="auto")`` on a CPU):

* native bf16 (AMX or AVX512-BF16): the bf16 encoder in PyTorch (fastest there);
* otherwise, when ``onnxruntime`` and the exporter (``onnx``, ``onnxscript``) are installed:
  int8 (int8 matmuls have 2x (AVX2) to 4x (VNNI) the fp32 peak rate; the masks agree with
  fp32: Dice >= 0.99, ``Testing/model/test_onnx.py``, ``model/benchmarks/cpu_paths.py``);
* else fp32. ``FASTSAM3D_CPU_INT8=0`` turns the int8 choice off.

The graphs are exported once per weights into the user cache (``$FASTSAM3D_CACHE/onnx/<digest>``,
keyed by a hash of the weights, so changed weights never reuse stale graphs).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

ENV_INT8 = "FASTSAM3D_CPU_INT8"


def exporter_available() -> bool:
    """Whether ONNX export and quantization can run here (onnx, onnxscript, onnxruntime)."""
    return all(
        importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime")
    )


def cpu_int8_preferred() -> bool:
    """The documented rule above, minus the bf16 check (the Runner does that first)."""
    if os.environ.get(ENV_INT8, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return exporter_available()


def onnx_dir_for(model: nn.Module, root: str | os.PathLike[str] | None = None) -> Path:
    """Where the graphs of ``model``'s weights live: ``root`` or the user cache, by digest."""
    from .onnx.export import weights_digest

    if root is None:
        from .hub import cache_dir

        root = cache_dir() / "onnx"
    return Path(root) / weights_digest(model)[:24]


def prepare_onnx(
    model: nn.Module, onnx_dir: str | os.PathLike[str] | None = None, int8: bool = True
) -> Path:
    """Export (once; reused while the weights' digest matches) and return the directory.

    ``onnx_dir``: a directory holding an export (from ``fastsam3d export-onnx``) or where to
    write one; default: the user cache.
    """
    from .onnx.export import export_onnx

    d = Path(onnx_dir) if onnx_dir is not None else onnx_dir_for(model)
    if not (d / "fastsam3d-onnx.json").exists():
        log.info("fastsam3d: exporting the network to ONNX in %s (once per weights)", d)
    export_onnx(model, d, int8=int8)
    return d
