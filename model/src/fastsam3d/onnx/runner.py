"""A runner for :class:`fastsam3d.Session` on ONNX Runtime and numpy only: no PyTorch anywhere.

:func:`torch_free_runner` reads an official ``.pth`` (PyTorch's zip format, through the
restricted reader :mod:`fastsam3d.pth_reader`) or a ``.safetensors`` file, finds the packaged
graph template the weights fit (the config), fills it (:mod:`fastsam3d.onnx.build`, cached per
weights digest) and returns an :class:`OrtRunner`. A ``Session`` given this runner keeps every
array in numpy (``array_backend = "numpy"``). Needs ``pip install fastsam3d[onnx]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .._sniff import sniff
from ..pth_reader import CheckpointReadError, read_pth, read_safetensors
from ..state_dict import normalise_keys, tensors_of
from .build import build_from_weights, digest_arrays, match_template
from .engine import OrtEngine, default_providers

__all__ = ["OrtRunner", "torch_free_runner", "weights_of"]

ENV_INT8 = "FASTSAM3D_CPU_INT8"  # "0": fp32 encoder on the CPU too (as fastsam3d.quantize)


class OrtRunner:
    """Encoder and click of one model on ONNX Runtime, with numpy arrays in and out: the
    interface :class:`fastsam3d.Session` uses (``encode``, ``click``, ``warmup``, ``device``,
    ``model``, ``point_policy``), plus ``array_backend = "numpy"``.

    Attributes:
        engine: The :class:`fastsam3d.onnx.engine.OrtEngine`.
        config: The registered config the weights fit (e.g. ``"fastsam3d"``).
        precision: ``"fp32"`` or ``"int8"`` (int8 encoder, fp32 click).
        providers: Execution provider of the encoder and of the click.
        device: ``"cpu"`` on the CPU provider, else the provider's short name (``"cuda"``);
            the arrays the session holds are numpy arrays in host memory either way.
    """

    array_backend = "numpy"
    model = None  # no PyTorch module behind it

    def __init__(self, engine: OrtEngine, config: str) -> None:
        self.engine = engine
        self.config = config
        self.precision = engine.precision
        self.providers = dict(engine.providers)
        provider = self.providers["encoder"]
        self.device = (
            "cpu"
            if provider == "CPUExecutionProvider"
            else provider.replace("ExecutionProvider", "").lower()
        )
        self.point_policy = engine.point_policy

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """(B, 1, 128, 128, 128) normalised crops -> (B, 384, 8, 8, 8) embeddings."""
        return self.engine.encode(crops)

    def click(
        self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray, mask: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompt encoder + decoder -> (low-res logits (1, 1, 32, 32, 32), iou (1, 1))."""
        return self.engine.click(embedding, coords, labels, mask)

    def warmup(self) -> None:
        """One encoder and one click run, so the first real click is not slow."""
        size = self.engine.img_size
        emb = self.encode(np.zeros((1, 1, size, size, size), np.float32))
        self.click(
            emb,
            np.full((1, 1, 3), size / 2, np.float32),
            np.ones((1, 1), np.int64),
            np.zeros((1, 1, size // 4, size // 4, size // 4), np.float32),
        )

    def __repr__(self) -> str:
        return (
            f"OrtRunner(config={self.config!r}, precision={self.precision!r}, "
            f"providers={self.providers})"
        )


def weights_of(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], str | None]:
    """(the float32 state dict with official keys, the block style recorded in the file) of a
    checkpoint, without PyTorch. Every malformed file or tensor is a CheckpointReadError (or
    the CheckpointError of :func:`fastsam3d._sniff.sniff`) naming it."""
    kind = sniff(path)
    obj = read_safetensors(path) if kind == "safetensors" else read_pth(path)
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("__metadata__")
    args = obj.get("args")
    style = (
        meta.get("block_style") if isinstance(meta, dict) else getattr(args, "block_style", None)
    )
    sd = tensors_of(obj, lambda v: isinstance(v, np.ndarray))
    if not sd:
        raise CheckpointReadError(
            f"{path}: no tensors found (expected a state dict or 'model_state_dict')"
        )
    sd = normalise_keys(sd)
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointReadError(f"{path}: tensor names must be strings, found {k!r}")
        if v.dtype.kind != "f":
            continue  # buffers such as counters are not graph weights
        if not np.isfinite(v).all():
            raise CheckpointReadError(f"{path}: tensor {k!r} holds NaN or Inf values")
        out[k] = np.ascontiguousarray(v, dtype=np.float32)
    return out, style


def torch_free_runner(
    path: str | os.PathLike[str],
    *,
    config: str | None = None,
    precision: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    providers: list[str] | None = None,
    threads: int = 0,
) -> OrtRunner:
    """An :class:`OrtRunner` for a checkpoint file, built without PyTorch.

    Args:
        path: An official ``.pth`` (zip format) or a ``.safetensors`` file of a registered
            config (FastSAM3D, SAM-Med3D-turbo).
        config: The registry config to run the weights as, e.g.
            ``"sam-med3d-turbo-fastsam3d-block"`` (``fastsam3d.get_weights(name).config``): the
            official SAM-Med3D-turbo file does not record a block style. Default: the style
            the file records, else the config's own.
        precision: ``"fp32"``, ``"int8"`` (int8 encoder: about twice as fast on CPUs, masks
            agree within Dice 0.99) or ``"auto"`` (int8 on the CPU provider unless
            ``FASTSAM3D_CPU_INT8=0``, else fp32).
        cache_dir: Where the filled graphs go (reused while the weights are the same);
            default ``<fastsam3d cache>/onnx-local/<digest>``.
        providers: ONNX Runtime execution providers (default: see
            :func:`fastsam3d.onnx.engine.default_providers`).
        threads: Intra-op threads (0 = ONNX Runtime's default).

    Raises:
        CheckpointReadError: The file is not a readable checkpoint, or a tensor is malformed.
        ValueError: The weights fit no packaged template (or not ``config``'s), or an unknown
            precision.
    """
    if precision not in ("auto", "fp32", "int8"):
        raise ValueError(
            f"precision must be 'auto', 'fp32' or 'int8' on ONNX Runtime, not {precision!r}"
        )
    weights, style = weights_of(path)
    meta = match_template(weights, style, config=config)
    if precision == "auto":
        first = (providers or default_providers("fp32"))[0]
        on_cpu = first == "CPUExecutionProvider"
        off = os.environ.get(ENV_INT8, "1").strip().lower() in ("0", "false", "no", "off")
        precision = "int8" if on_cpu and not off else "fp32"
    if cache_dir is None:
        from ..hub import cache_dir as user_cache

        digest = digest_arrays(sorted(weights.items()), meta["config"])
        out = user_cache() / "onnx-local" / digest[:24]
    else:
        out = Path(cache_dir)
    build_from_weights(weights, out, style=meta["block_style"], int8=precision == "int8")
    engine = OrtEngine(out, precision, providers=providers, threads=threads)
    return OrtRunner(engine, meta["config"])
