"""Graph files without PyTorch: int8 quantisation of an exported encoder (ONNX Runtime's
maintained quantizer) and filling weightless graph templates with checkpoint tensors.

Needs ``onnx`` and ``onnxruntime`` (``pip install fastsam3d[onnx]``), never torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..configs import CONFIGS
from .layout import CLICK, ENCODER, ENCODER_INT8, FORMAT_VERSION, META


def quantize_encoder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Dynamic int8 quantisation of the encoder's MatMul/Gemm weights (per output channel,
    signed; activations quantised per call), written atomically.

    The graph is first constant-folded by ONNX Runtime's basic (platform-independent) offline
    optimisation, so each weight reaches its MatMul as an initializer the quantizer can see.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp, atomic_path(dst) as out:
        folded = Path(tmp) / "folded.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(folded)
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        root = logging.getLogger()
        before, root.disabled = root.disabled, True  # the quantizer logs advice at WARNING
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_dynamic(
                    str(folded),
                    str(out),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm"],
                )
        finally:
            root.disabled = before
    return dst


# --- weights digest (shared with the exporter) ---------------------------------------------
def digest_arrays(items: Iterable[tuple[str, np.ndarray]], extra: str = "") -> str:
    """SHA-256 over (name, shape, float32 bytes) of each tensor, the format version and
    ``extra`` (the config): the cache key of built graphs, so changed weights never reuse
    stale files."""
    h = hashlib.sha256(f"fastsam3d-onnx-v{FORMAT_VERSION}".encode())
    for name, a in items:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(name.encode())
        h.update(str(tuple(a.shape)).encode())
        h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()


# --- templates: the graphs with their weights taken out -------------------------------------
TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE_INFO = "template.json"


def strip_weights(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], keys: Iterable[str]
) -> list[str]:
    """Write ``src`` without the data of the initializers named in ``keys`` (names, shapes and
    types stay); returns the names stripped. Everything else (the ops, small constants) is kept.
    """
    import onnx

    keys = set(keys)
    model = onnx.load(str(src))
    stripped = []
    for init in model.graph.initializer:
        if init.name in keys:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            stripped.append(init.name)
    for node in model.graph.node:  # exporter stack traces: not needed to run, most of the size
        node.ClearField("doc_string")
        node.ClearField("metadata_props")
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return stripped


def fill_template(
    template: str | os.PathLike[str],
    weights: dict[str, np.ndarray],
    dst: str | os.PathLike[str],
    names: Iterable[str],
) -> Path:
    """The template with each initializer in ``names`` set from ``weights`` (float32, shapes
    checked); a missing or misshapen tensor is an error naming it."""
    import onnx
    from onnx import numpy_helper

    names = set(names)
    model = onnx.load(str(template))
    missing, wrong = [], []
    for i, init in enumerate(model.graph.initializer):
        if init.name not in names:
            continue
        a = weights.get(init.name)
        if a is None:
            missing.append(init.name)
            continue
        if tuple(a.shape) != tuple(init.dims):
            wrong.append(f"{init.name}: file {tuple(a.shape)} vs network {tuple(init.dims)}")
            continue
        t = numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), init.name)
        model.graph.initializer[i].CopyFrom(t)
    if missing or wrong:
        raise ValueError(
            "the weights do not fit the graph: "
            + "; ".join([f"missing {m}" for m in missing[:10]] + wrong[:10])
        )
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return dst


def list_templates(root: str | os.PathLike[str] | None = None) -> dict[str, dict]:
    """Config name -> template info (what :func:`fastsam3d.onnx.export.write_template` wrote)."""
    root = Path(root) if root is not None else TEMPLATES
    out = {}
    for info in sorted(root.glob(f"*/{TEMPLATE_INFO}")):
        meta = json.loads(info.read_text())
        meta["dir"] = info.parent
        out[meta["config"]] = meta
    return out


def match_template(
    weights: dict[str, np.ndarray],
    style: str | None = None,
    root: str | os.PathLike[str] | None = None,
    config: str | None = None,
) -> dict:
    """The template whose weights are exactly the file's keys with the same shapes. Block style
    cannot be seen in weights: ``config`` (a registry config the caller asks for, e.g. the
    ``sam-med3d-turbo-fastsam3d-block`` weights entry) decides, else ``style`` (recorded by our
    exporters) picks among equal fits, else the config registered first (a block-style
    variant, ``configs.BLOCK_STYLE_VARIANTS``, is registered after the config it varies:
    SAM-Med3D's standard block for 12-block files)."""
    fits = []
    for meta in list_templates(root).values():
        shapes = meta["shapes"]
        if set(shapes) == set(weights) and all(
            tuple(weights[k].shape) == tuple(v) for k, v in shapes.items()
        ):
            fits.append(meta)
    if config is not None:
        fitting = ", ".join(sorted(m["config"] for m in fits)) or "none"
        fits = [m for m in fits if m["config"] == config]
        if not fits:
            raise ValueError(f"the weights do not fit config {config!r} (they fit: {fitting})")
    if style is not None:
        fits = [m for m in fits if m["block_style"] == style] or fits
    order = {name: i for i, name in enumerate(CONFIGS)}
    fits.sort(key=lambda m: order.get(m["config"], len(order)))
    if not fits:
        known = ", ".join(sorted(list_templates(root))) or "none installed"
        raise ValueError(
            f"the weights fit none of the graph templates ({known}); export the "
            "graphs where PyTorch is installed: fastsam3d export-onnx"
        )
    return fits[0]


def build_from_weights(
    weights: dict[str, np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    style: str | None = None,
    int8: bool = True,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Encoder/click graphs (and the int8 encoder) for a numpy state dict with official keys,
    from the packaged templates, without PyTorch. Reused while the digest matches."""
    meta = match_template(weights, style, root)
    out = Path(out_dir)
    digest = digest_arrays(sorted(weights.items()), meta["config"])
    info = out / META
    files = {"encoder": out / ENCODER, "click": out / CLICK}
    if int8:
        files["encoder_int8"] = out / ENCODER_INT8
    if info.exists():
        old = json.loads(info.read_text())
        if old.get("digest") == digest and all(p.exists() for p in files.values()):
            return out
    out.mkdir(parents=True, exist_ok=True)
    tdir = Path(meta["dir"])
    fill_template(tdir / ENCODER, weights, files["encoder"], meta["encoder_weights"])
    fill_template(tdir / CLICK, weights, files["click"], meta["click_weights"])
    if int8:
        quantize_encoder(files["encoder"], files["encoder_int8"])
    record = {
        "format": FORMAT_VERSION,
        "digest": digest,
        "config": meta["config"],
        "point_policy": meta["point_policy"],
        "img_size": meta["img_size"],
        "files": {k: p.name for k, p in files.items()},
        "from_template": True,
    }
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return out
