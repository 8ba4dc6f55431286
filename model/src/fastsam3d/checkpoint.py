"""Checkpoints: safe reading of every published container, config detection, loading, export.

Forms read (all without executing code):

* full-model dicts ``{"model_state_dict": {...prefixed keys...}, "args": argparse.Namespace, ...}``
  (SAM-Med3D-turbo, FastSAM3D.pth, training outputs);
* FastSAM3D's encoder-only file (un-prefixed encoder keys), merged with a separate file that
  holds the prompt encoder and decoder (``decoder=``);
* raw state dicts (also ``{"state_dict": ...}`` / ``{"model": ...}`` and DDP ``module.`` keys);
* safetensors.

Pickles are opened with ``torch.load(weights_only=True)`` and an allowlist that admits
``argparse.Namespace`` and nothing else, so a crafted file is refused before any of its code runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import atomic_path
from .build import MODEL_CONFIGS, ModelConfig, build_model, get_config
from .modeling import Sam3D

log = logging.getLogger(__name__)

PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the network."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict:
    """Read a checkpoint file into a plain dict, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            out: dict = {k: f.get_tensor(k) for k in f.keys()}
            out["__metadata__"] = dict(f.metadata() or {})
        return out
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors and "
            f"argparse.Namespace, which could run code when unpickled. ({exc})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {exc}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def extract_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a container, keys normalised: DDP ``module.`` stripped and an
    encoder-only file (FastSAM3D's distilled encoder) given the ``image_encoder.`` prefix."""
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("no tensors found (expected a state dict or 'model_state_dict')")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith(PREFIXES) for k in sd) and "patch_embed.proj.weight" in sd:
        sd = {f"image_encoder.{k}": v for k, v in sd.items()}
    return sd


def detect_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Which network a state dict holds, from its keys and shapes.

    Block style cannot be seen in weights: 12-block files are reported as ``sam-med3d-turbo``
    (pass ``config="sam-med3d-turbo-fastsam3d-block"`` to run them the FastSAM3D way).
    """
    pre = "image_encoder.blocks."
    blocks = sorted({int(k[len(pre):].split(".")[0]) for k in sd if k.startswith(pre)})
    if not blocks:
        raise CheckpointError("no image-encoder blocks in this file (is it a decoder-only file?)")
    depth = blocks[-1] + 1
    attn_free = 0
    while attn_free < depth and f"{pre}{attn_free}.attn.qkv.weight" not in sd:
        attn_free += 1
    embed_dim = sd[f"{pre}0.norm2.weight"].shape[0]
    windows, globals_ = set(), []
    head_dim = None
    for b in range(attn_free, depth):
        table = sd.get(f"{pre}{b}.attn.rel_pos_d")
        if table is None:
            continue
        head_dim = table.shape[1]
        size = (table.shape[0] + 1) // 2
        grid = MODEL_CONFIGS["fastsam3d"].grid
        if size == grid:
            globals_.append(b)
        else:
            windows.add(size)
    if len(windows) > 1:
        raise CheckpointError(f"inconsistent window sizes in rel-pos tables: {sorted(windows)}")
    num_heads = embed_dim // head_dim if head_dim else MODEL_CONFIGS["fastsam3d"].num_heads
    pe = sd.get("prompt_encoder.point_embeddings.3.weight")
    window = windows.pop() if windows else 0
    fields = dict(
        depth=depth, embed_dim=embed_dim, num_heads=num_heads, window_size=window,
        out_chans=sd["image_encoder.neck.0.weight"].shape[0],
        global_attn_indexes=tuple(globals_) if window else (),
        num_attn_free_blocks=attn_free, num_point_embeddings=4 if pe is not None else 2,
    )
    for cfg in MODEL_CONFIGS.values():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return cfg
    base = "fastsam3d" if attn_free else "sam-med3d-turbo"
    return dataclasses.replace(MODEL_CONFIGS[base], name=f"custom({base}-like)", **fields)


def _shape_report(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if own[k].shape != sd[k].shape
    )
    if not (missing or unexpected or wrong):
        return None

    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:20]) + more

    parts = [block(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("wrong shapes", wrong)) if i]
    return "\n".join(parts)


def recorded_block_style(obj: Mapping) -> str | None:
    """The block style our exporters record (safetensors metadata or the ``args`` Namespace):
    weights alone cannot tell a FastSAM3D-block teacher from a standard one."""
    meta = obj.get("__metadata__")
    if isinstance(meta, Mapping):
        return meta.get("block_style")
    args = obj.get("args")
    return getattr(args, "block_style", None) if isinstance(args, argparse.Namespace) else None


def load_state_dict_file(
    path: str | os.PathLike[str], decoder: str | os.PathLike[str] | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors of ``path`` + the prompt encoder / decoder of ``decoder`` with normalised keys,
    the recorded block style if any)."""
    obj = read_checkpoint(path)
    style = recorded_block_style(obj)
    sd = extract_state_dict(obj)
    if decoder is not None:
        extra = extract_state_dict(read_checkpoint(decoder))
        parts = {k: v for k, v in extra.items() if k.startswith(PREFIXES[1:])}
        if not parts:
            raise CheckpointError(f"{decoder} holds no prompt_encoder./mask_decoder. keys")
        sd.update(parts)
    return sd, style


def load_model(
    path_or_name: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    config: str | ModelConfig | None = None,
    decoder: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    attn_backend: str = "sdpa",
) -> Sam3D:
    """A ready (eval, on ``device``) model from a checkpoint path or a registered weights name.

    ``config`` overrides detection (e.g. run SAM-Med3D weights with FastSAM3D's block);
    ``decoder`` supplies the prompt encoder + decoder for an encoder-only file; ``sha256`` pins
    the file's hash (registered names are always verified against the recorded hash).
    """
    path = Path(path_or_name)
    if not path.exists() and isinstance(path_or_name, str):
        from . import hub

        names = {w.name for w in hub.list_weights()}
        if path_or_name in names:
            path = hub.download(path_or_name, sha256=sha256)
            sha256 = None  # verified by the hub
            if config is None:
                config = hub.get_weights_info(path_or_name).config
        else:
            raise CheckpointError(
                f"{path_or_name!r} is neither a file nor a registered weights name "
                f"({', '.join(sorted(names))})"
            )
    if sha256:
        from . import hub

        hub.verify_file(path, sha256)
    sd, style = load_state_dict_file(path, decoder)
    cfg = get_config(config) if config is not None else detect_config(sd)
    if config is None and style and style != cfg.block_style:
        named = MODEL_CONFIGS.get(f"{cfg.name}-fastsam3d-block") if style == "fastsam3d" else None
        cfg = named or dataclasses.replace(cfg, block_style=style)
    has_parts = {p for p in PREFIXES if any(k.startswith(p) for k in sd)}
    if has_parts == {"image_encoder."}:
        raise CheckpointError(
            f"{path} holds only an image encoder ({cfg.summary()}); pass decoder=<file with the "
            "prompt encoder and mask decoder> (e.g. the SAM-Med3D-turbo or FastSAM3D checkpoint)"
        )
    model = build_model(cfg, attn_backend=attn_backend)
    report = _shape_report(model, sd)
    if report:
        raise CheckpointError(f"{path} does not fit the {cfg.name} network:\n{report}")
    model.load_state_dict(sd, strict=True)
    log.info("loaded %s as %s", path, cfg.summary())
    return model.to(device).eval()


def _state_dict_of(model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict:
    if isinstance(model_or_sd, torch.nn.Module):
        model_or_sd = model_or_sd.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in model_or_sd.items()}


def save_official(
    model: Sam3D | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    **metadata: object,
) -> Path:
    """Write the official container ``{"model_state_dict", "args": Namespace}`` atomically,
    readable by the public FastSAM3D / SAM-Med3D code and by :func:`load_model`."""
    path = Path(path)
    cfg = getattr(model, "config", None)
    args = argparse.Namespace(
        model_type="vit_b_ori", fastsam3d_config=cfg.name if cfg else None,
        block_style=cfg.block_style if cfg else None, **metadata,
    )
    with atomic_path(path) as tmp:
        torch.save({"model_state_dict": _state_dict_of(model), "args": args}, tmp)
    return path


def save_safetensors(
    model: Sam3D | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file atomically (no pickle at all; the config name in metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = dict(metadata or {})
    cfg = getattr(model, "config", None)
    if cfg is not None:
        meta.setdefault("fastsam3d_config", cfg.name)
        meta.setdefault("block_style", cfg.block_style)
    with atomic_path(path) as tmp:
        save_file(_state_dict_of(model), str(tmp), metadata=meta)
    return path
