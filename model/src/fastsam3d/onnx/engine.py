"""The ONNX Runtime engine: the encoder and the click on numpy arrays, no PyTorch.

Execution providers, in order of preference when present in the installed onnxruntime
package: ``CUDAExecutionProvider`` (package ``onnxruntime-gpu``), ``CoreMLExecutionProvider``
(Apple Silicon / macOS wheels), ``CPUExecutionProvider`` (always). The int8 encoder runs on the
CPU provider only: its dynamic-quantisation ops are CPU kernels, and GPUs have faster paths.
Override with ``providers=[...]`` or the ``FASTSAM3D_ORT_PROVIDERS`` environment variable
(comma-separated names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .layout import CLICK, ENCODER, ENCODER_INT8, META

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")
ORT_PRECISIONS = ("fp32", "int8")


def available() -> bool:
    """Whether onnxruntime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_providers(precision: str = "fp32") -> list[str]:
    """The providers this engine uses: ``FASTSAM3D_ORT_PROVIDERS`` if set, else the preferred
    ones the installed onnxruntime offers (CPU only for int8)."""
    import onnxruntime as ort

    env = os.environ.get("FASTSAM3D_ORT_PROVIDERS")
    have = ort.get_available_providers()
    if env:
        wanted = [p.strip() for p in env.split(",") if p.strip()]
        missing = [p for p in wanted if p not in have]
        if missing:
            raise RuntimeError(
                f"FASTSAM3D_ORT_PROVIDERS names {missing}, not offered by this "
                f"onnxruntime ({', '.join(have)})"
            )
        return wanted
    if precision == "int8":
        return ["CPUExecutionProvider"]
    return [p for p in PREFERRED_PROVIDERS if p in have] or ["CPUExecutionProvider"]


class OrtEngine:
    """Encoder + click of one exported model (see :mod:`fastsam3d.onnx.export`).

    ``precision``: ``"fp32"`` (equal to PyTorch within 1e-4 relative on the parity cases) or
    ``"int8"`` (the dynamically quantised encoder; the click stays fp32). ``threads``: intra-op
    threads (0 = onnxruntime's default, one per physical core).
    """

    def __init__(
        self,
        onnx_dir: str | os.PathLike[str],
        precision: str = "fp32",
        *,
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        if precision not in ORT_PRECISIONS:
            raise ValueError(f"precision must be one of {ORT_PRECISIONS}, got {precision!r}")
        d = Path(onnx_dir)
        meta_path = d / META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{d} holds no exported model ({META} missing); run `fastsam3d export-onnx` first"
            )
        self.meta: dict = json.loads(meta_path.read_text())
        enc_file = d / (ENCODER_INT8 if precision == "int8" else ENCODER)
        for f in (enc_file, d / CLICK):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is missing (re-run `fastsam3d export-onnx`"
                    + (" with int8" if f.name == ENCODER_INT8 else "")
                    + ")"
                )
        self.precision = precision
        self.img_size = int(self.meta.get("img_size", 128))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only (constant folding reports CastLike nodes)
        # no busy-waiting between calls: the session's other work (crop sampling, paste-back in
        # numpy/PyTorch) runs on the same cores right after each call (measured on 16 threads:
        # spinning ORT threads made the following paste 4x slower)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        enc_providers = list(providers or default_providers(precision))
        click_providers = list(providers or default_providers("fp32"))
        self.encoder = ort.InferenceSession(str(enc_file), opts, providers=enc_providers)
        self.click_session = ort.InferenceSession(str(d / CLICK), opts, providers=click_providers)
        self.providers = {
            "encoder": self.encoder.get_providers()[0],
            "click": self.click_session.get_providers()[0],
        }
        self._low = tuple(int(s) for s in self.click_session.get_inputs()[3].shape[2:])

    @property
    def point_policy(self) -> str | None:
        return self.meta.get("point_policy")

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """(B, 1, S, S, S) normalised crops -> (B, 384, 8, 8, 8) float32 embeddings (the graph
        takes one crop; a batch runs crop by crop)."""
        x = np.ascontiguousarray(crops, dtype=np.float32)
        if x.ndim != 5 or x.shape[1:] != (1,) + (self.img_size,) * 3:
            raise ValueError(
                f"crops must be (B, 1, {self.img_size}, {self.img_size}, "
                f"{self.img_size}), got {x.shape}"
            )
        outs = [self.encoder.run(None, {"crop": x[i : i + 1]})[0] for i in range(x.shape[0])]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def click(
        self,
        embedding: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray | None,
        multimask_output: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompt encoder + decoder -> (low-res logits (1, C, 32, 32, 32), iou (1, C)) float32,
        C = 3 with ``multimask_output`` else 1. ``mask_input=None`` is the no-mask path."""
        has = mask_input is not None
        mask = (
            np.asarray(mask_input, dtype=np.float32)
            if has
            else np.zeros((1, 1) + self._low, dtype=np.float32)
        )
        feeds: dict[str, Any] = {
            "embedding": np.ascontiguousarray(embedding, dtype=np.float32),
            "coords": np.ascontiguousarray(coords, dtype=np.float32),
            "labels": np.ascontiguousarray(labels, dtype=np.int64),
            "mask": np.ascontiguousarray(mask),
            "has_mask": np.array([has]),
        }
        low, iou = self.click_session.run(None, feeds)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return low[:, sl], iou[:, sl]
