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
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..modeling import Sam3D
from ..modeling.common import patch_conv
from .build import TEMPLATE_INFO, digest_arrays, quantize_encoder, strip_weights
from .layout import CLICK, ENCODER, ENCODER_INT8, FORMAT_VERSION, META

log = logging.getLogger(__name__)

OPSET = 18


class _Encoder(nn.Module):
    """The image encoder with its 16^3 patch convolution written as the equivalent GEMM (same
    sums; a GEMM is what ONNX Runtime quantises and runs fastest). Attribute names follow the
    official key prefixes, so every weight initializer of the graph is named by its key."""

    def __init__(self, model: Sam3D) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        enc = self.image_encoder
        x = patch_conv(crop, enc.patch_embed.proj).permute(0, 2, 3, 4, 1)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            x = blk(x)
        x = x.permute(0, 4, 1, 2, 3)
        for layer in enc.neck:
            if isinstance(layer, nn.Conv3d) and layer.bias is None:
                # an explicit zero bias: the unoptimised export of a bias-free conv builds a
                # zero bias of the wrong size (ONNX Runtime then refuses the graph)
                w = layer.weight
                x = F.conv3d(x, w, w.new_zeros(w.shape[0]), layer.stride, layer.padding)
            else:
                x = layer(x)
        return x


class _Click(nn.Module):
    """Prompt encoder + mask decoder, every mask token, the mask prompt selected by a flag."""

    def __init__(self, model: Sam3D) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=mask)
        none = pe.no_mask_embed.weight.reshape(1, -1, 1, 1, 1)
        dense = torch.where(has_mask.reshape(1, 1, 1, 1, 1), dense, none)
        # the dense PE from the Gaussian matrix in the graph (ONNX Runtime folds it at load),
        # so the graph's only weights are the checkpoint's tensors
        dense_pe = pe.pe_layer(pe.image_embedding_size)[None]
        return self.mask_decoder.predict_masks(embedding, dense_pe, sparse, dense)


def weights_digest(model: nn.Module) -> str:
    """The cache key of ``model``'s graphs (:func:`fastsam3d.onnx.build.digest_arrays` over its
    state dict and config)."""
    items = (
        (k, t.detach().to("cpu", torch.float32).numpy()) for k, t in model.state_dict().items()
    )
    return digest_arrays(items, repr(getattr(model, "config", None)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The dynamo exporter prints progress lines; keep them out of the user's console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    names: tuple[list[str], list[str]],
    dynamic_shapes: dict | None = None,
) -> None:
    with atomic_path(path) as tmp, torch.no_grad(), _quiet():
        # optimize=False keeps each weight as an initializer named by its state-dict key (the
        # optimiser would fold transposes into anonymous constants); ONNX Runtime folds at load
        torch.onnx.export(
            module,
            args,
            str(tmp),
            dynamo=True,
            opset_version=OPSET,
            optimize=False,
            input_names=names[0],
            output_names=names[1],
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )


def export_onnx(
    model: Sam3D, out_dir: str | os.PathLike[str], *, int8: bool = True, overwrite: bool = False
) -> dict[str, Path]:
    """Write ``encoder.onnx``, ``click.onnx`` (and ``encoder.int8.onnx``) for ``model`` into
    ``out_dir`` with a ``fastsam3d-onnx.json`` that records the weights' digest and config.

    Existing files are reused when their recorded digest matches, and never replaced unless
    ``overwrite`` (a directory holding another model's graphs is an error, not overwritten).
    """
    from ..modeling.attention import Attention as EncoderAttention
    from ..modeling.transformer import Attention as DecoderAttention

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
        if (
            meta.get("digest") == digest
            and int8
            and paths["encoder"].exists()
            and paths["click"].exists()
        ):
            quantize_encoder(paths["encoder"], paths["encoder_int8"])  # only int8 was missing
            return paths
        if meta.get("digest") != digest and not overwrite:
            raise FileExistsError(
                f"{out} holds ONNX graphs of other weights; pass "
                "overwrite=True (--overwrite) or choose another directory"
            )
    backends = {m: m.backend for m in model.modules() if isinstance(m, EncoderAttention)}
    # the click graph keeps the decoder's plain form (a dynamic number of points; the packaged
    # templates are exported this way): no folded attention, upscaling as convolutions
    plain = {m: m.fold for m in model.modules() if isinstance(m, DecoderAttention)}
    gemm = model.mask_decoder.gemm_upscaling
    try:
        for m in backends:
            m.backend = "sdpa"  # the exact default kernels (SDPA with the rel-pos bias)
        for m in plain:
            m.fold = False
        model.mask_decoder.gemm_upscaling = False
        crop = torch.zeros(1, 1, *(model.image_encoder.img_size,) * 3)
        _export(_Encoder(model).eval(), (crop,), paths["encoder"], (["crop"], ["embedding"]))
        pe = model.prompt_encoder
        emb = torch.zeros(1, pe.embed_dim, *pe.image_embedding_size)
        low = pe.mask_input_size
        args = (
            emb,
            torch.zeros(1, 2, 3),
            torch.ones(1, 2, dtype=torch.long),
            torch.zeros(1, 1, *low),
            torch.ones(1, dtype=torch.bool),
        )
        n = torch.export.Dim("points", min=1, max=64)
        _export(
            _Click(model).eval(),
            args,
            paths["click"],
            (["embedding", "coords", "labels", "mask", "has_mask"], ["low_res", "iou"]),
            dynamic_shapes={
                "embedding": None,
                "coords": {1: n},
                "labels": {1: n},
                "mask": None,
                "has_mask": None,
            },
        )
    finally:
        for m, b in backends.items():
            m.backend = b
        for m, f in plain.items():
            m.fold = f
        model.mask_decoder.gemm_upscaling = gemm
    if int8:
        quantize_encoder(paths["encoder"], paths["encoder_int8"])
    cfg = getattr(model, "config", None)
    meta = {
        "format": FORMAT_VERSION,
        "digest": digest,
        "opset": OPSET,
        "config": getattr(cfg, "name", None),
        "point_policy": getattr(cfg, "point_policy", None),
        "img_size": model.image_encoder.img_size,
        "files": {k: p.name for k, p in paths.items()},
    }
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return paths


def write_template(model: Sam3D, out_dir: str | os.PathLike[str]) -> Path:
    """Export ``model`` and keep the graphs without their weights (a few hundred kB) plus
    ``template.json`` (config, weight names and shapes): what the torch-free path fills from a
    checkpoint (:func:`fastsam3d.onnx.build.build_from_weights`). One per registered config,
    shipped in ``fastsam3d/onnx/templates``."""
    import tempfile

    out = Path(out_dir)
    cfg = model.config
    sd = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_onnx(model, tmp, int8=False)
        enc = strip_weights(paths["encoder"], out / ENCODER, sd)
        click = strip_weights(paths["click"], out / CLICK, sd)
    meta = {
        "format": FORMAT_VERSION,
        "config": cfg.name,
        "block_style": cfg.block_style,
        "point_policy": cfg.point_policy,
        "img_size": model.image_encoder.img_size,
        "encoder_weights": enc,
        "click_weights": click,
        "shapes": {k: list(v.shape) for k, v in sd.items()},
    }
    with atomic_path(out / TEMPLATE_INFO) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return out
