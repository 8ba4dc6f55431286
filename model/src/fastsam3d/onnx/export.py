"""Export the encoder and the click to ONNX (PyTorch side; needs torch, onnx and onnxscript).

Two graphs per model, static shapes except the number of click points:

* ``encoder.onnx``: (1, 1, 128, 128, 128) normalised crop -> (1, 384, 8, 8, 8) embedding;
* ``click.onnx``: prompt encoder + mask decoder. Inputs: the embedding, point coordinates
  (1, N, 3) in crop voxels, labels (1, N) int64, the low-res mask prompt (1, 1, 32, 32, 32) and
  ``has_mask`` (1,) bool (False selects the ``no_mask_embed`` path, as ``mask_input=None`` does).
  Outputs all four mask tokens' logits (1, 4, 32, 32, 32) and IoUs (1, 4): token 0 is the single
  mask, 1..3 the multimask outputs (the runner picks), so one graph serves both.

``encoder.int8.onnx`` is the encoder after ONNX Runtime's dynamic quantization (int8 weights,
per output channel; activations quantised per call) of every MatMul/Gemm, i.e. the Linear layers
that hold ~88 % of the encoder's FLOPs. Convolutions stay fp32: the patch embedding is one
(512 x 4096) x (4096 x 768) product, exported as a GEMM, so it is quantised with the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..modeling import Sam3D
from ..modeling.common import patch_conv
from .layout import CLICK, ENCODER, ENCODER_INT8, FORMAT_VERSION, META

log = logging.getLogger(__name__)

OPSET = 18


class _Encoder(nn.Module):
    """The image encoder with its 16^3 patch convolution written as the equivalent GEMM (same
    sums; a GEMM is what ONNX Runtime quantises and runs fastest)."""

    def __init__(self, model: Sam3D) -> None:
        super().__init__()
        self.enc = model.image_encoder

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        enc = self.enc
        x = patch_conv(crop, enc.patch_embed.proj).permute(0, 2, 3, 4, 1)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            x = blk(x)
        return enc.neck(x.permute(0, 4, 1, 2, 3))


class _Click(nn.Module):
    """Prompt encoder + mask decoder, every mask token, the mask prompt selected by a flag."""

    def __init__(self, model: Sam3D) -> None:
        super().__init__()
        self.pe = model.prompt_encoder
        self.dec = model.mask_decoder
        with torch.no_grad():  # a constant of the weights (the cached dense PE)
            self.register_buffer("dense_pe", self.pe.pe_layer(self.pe.image_embedding_size)[None])

    def forward(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor, has_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.pe
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=mask)
        none = pe.no_mask_embed.weight.reshape(1, -1, 1, 1, 1)
        dense = torch.where(has_mask.reshape(1, 1, 1, 1, 1), dense, none)
        low_res, iou = self.dec.predict_masks(embedding, self.dense_pe, sparse, dense)
        return low_res, iou


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, bytes) and the export format: the cache key
    of exported graphs, so changed weights never reuse stale files."""
    h = hashlib.sha256(f"fastsam3d-onnx-v{FORMAT_VERSION}".encode())
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(repr(cfg).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The dynamo exporter prints progress lines; keep them out of the user's console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _export(module: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]],
            dynamic_shapes: dict | None = None) -> None:
    with atomic_path(path) as tmp, torch.no_grad(), _quiet():
        torch.onnx.export(module, args, str(tmp), dynamo=True, opset_version=OPSET,
                          input_names=names[0], output_names=names[1],
                          dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)


def export_onnx(model: Sam3D, out_dir: str | os.PathLike[str], *, int8: bool = True,
                overwrite: bool = False) -> dict[str, Path]:
    """Write ``encoder.onnx``, ``click.onnx`` (and ``encoder.int8.onnx``) for ``model`` into
    ``out_dir`` with a ``fastsam3d-onnx.json`` that records the weights' digest and config.

    Existing files are reused when their recorded digest matches, and never replaced unless
    ``overwrite`` (a directory holding another model's graphs is an error, not overwritten).
    """
    from ..modeling.attention import Attention as EncoderAttention

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    digest = weights_digest(model)
    meta_path = out / META
    paths = {"encoder": out / ENCODER, "click": out / CLICK}
    if int8:
        paths["encoder_int8"] = out / ENCODER_INT8
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") == digest and all(p.exists() for p in paths.values()):
            return paths
        if (meta.get("digest") == digest and int8 and paths["encoder"].exists()
                and paths["click"].exists()):
            quantize_encoder(paths["encoder"], paths["encoder_int8"])  # only int8 was missing
            return paths
        if meta.get("digest") != digest and not overwrite:
            raise FileExistsError(f"{out} holds ONNX graphs of other weights; pass "
                                  "overwrite=True (--overwrite) or choose another directory")
    backends = {m: m.backend for m in model.modules() if isinstance(m, EncoderAttention)}
    try:
        for m in backends:
            m.backend = "sdpa"  # the exact default kernels (SDPA with the rel-pos bias)
        crop = torch.zeros(1, 1, *(model.image_encoder.img_size,) * 3)
        _export(_Encoder(model).eval(), (crop,), paths["encoder"], (["crop"], ["embedding"]))
        pe = model.prompt_encoder
        emb = torch.zeros(1, pe.embed_dim, *pe.image_embedding_size)
        low = pe.mask_input_size
        args = (emb, torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.long),
                torch.zeros(1, 1, *low), torch.ones(1, dtype=torch.bool))
        n = torch.export.Dim("points", min=1, max=64)
        _export(_Click(model).eval(), args, paths["click"],
                (["embedding", "coords", "labels", "mask", "has_mask"], ["low_res", "iou"]),
                dynamic_shapes={"embedding": None, "coords": {1: n}, "labels": {1: n},
                                "mask": None, "has_mask": None})
    finally:
        for m, b in backends.items():
            m.backend = b
    if int8:
        quantize_encoder(paths["encoder"], paths["encoder_int8"])
    cfg = getattr(model, "config", None)
    meta = {"format": FORMAT_VERSION, "digest": digest, "opset": OPSET,
            "config": getattr(cfg, "name", None),
            "point_policy": getattr(cfg, "point_policy", None),
            "img_size": model.image_encoder.img_size,
            "files": {k: p.name for k, p in paths.items()}}
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return paths


def quantize_encoder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """ONNX Runtime dynamic quantization of the encoder's MatMul/Gemm weights to int8 (per
    channel, signed), written atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with atomic_path(dst) as tmp, _quiet():
        logging.getLogger().disabled, before = True, logging.getLogger().disabled
        try:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            logging.getLogger().disabled = before
    return dst
