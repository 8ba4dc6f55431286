"""Checkpoints: safe reading of every published container, config detection, loading, export.

Forms read (all without executing code):

* full-model dicts ``{"model_state_dict": {...prefixed keys...}, "args": argparse.Namespace, ...}``
  (SAM-Med3D-turbo, FastSAM3D.pth, training outputs);
* FastSAM3D's encoder-only file (un-prefixed encoder keys), merged with a separate file that
  holds the prompt encoder and decoder (``decoder=``);
* raw state dicts (also ``{"state_dict": ...}`` / ``{"model": ...}`` and DDP ``module.`` keys);
* safetensors.

Pickles are opened with ``torch.load(weights_only=True)`` and an allowlist that admits
``argparse.Namespace`` and nothing else, so a crafted file is refused before any of its code runs;
only on a torch at or above :data:`fastsam3d._requirements.TORCH_REQUIREMENT` (older ones have
known ``weights_only`` bypasses), and only after :func:`fastsam3d._sniff.sniff` has checked the
bytes (zip or safetensors, nothing that inflates beyond the file). Before a network is built its
config is bounded, keys and shapes are compared with a skeleton on the ``meta`` device (no
memory), and non-floating or non-finite weights are refused with the tensor's name, so a small
crafted file cannot exhaust memory or load silently broken weights. Every malformed file raises
:class:`CheckpointError`.
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

from ._requirements import TORCH_ADVISORY, TORCH_REQUIREMENT, torch_loads_pickles_safely
from ._sniff import CheckpointError, safetensors_header, sniff
from .atomic import atomic_path
from .build import build_model
from .configs import CONFIGS, MAX_WINDOW, ModelConfig, check_config, get_config, with_block_style
from .modeling import Sam3D
from .state_dict import PREFIXES, normalise_keys, tensors_of

log = logging.getLogger(__name__)


__all__ = [
    "CheckpointError",
    "detect_config",
    "extract_state_dict",
    "load_model",
    "load_state_dict_file",
    "read_checkpoint",
    "read_state_dict",
    "save_official",
    "save_safetensors",
]


def read_checkpoint(path: str | os.PathLike[str]) -> dict:
    """Read a checkpoint file into a plain dict, never executing code from it.

    The format is decided by the bytes (:func:`fastsam3d._sniff.sniff`), not the suffix.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        _, meta = safetensors_header(path)
        try:
            from safetensors import safe_open
        except ImportError:
            raise CheckpointError(
                f"{path} is a safetensors file; reading it needs the safetensors package "
                "(pip install safetensors)"
            ) from None
        try:
            with safe_open(str(path), framework="pt") as f:
                out: dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # SafetensorError and friends: one error type for callers
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
        out["__metadata__"] = dict(meta)
        return out
    if not torch_loads_pickles_safely():
        raise CheckpointError(
            f"refused to unpickle {path}: torch {torch.__version__} is older than "
            f"{TORCH_REQUIREMENT} and its weights_only loader can be bypassed "
            f"({TORCH_ADVISORY}). Upgrade torch, or convert the file to safetensors on a "
            "newer torch (`fastsam3d convert FILE.pth FILE.safetensors`) and load that"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors and "
            f"argparse.Namespace ({_unsafe_globals(path)}), which could run code when "
            "unpickled; nothing from it was run"
        ) from None
    except Exception as exc:  # RuntimeError, EOFError, OSError, ValueError, ...
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint: {_reason(exc)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _reason(exc: BaseException) -> str:
    """The first line of an exception's text, without terminal escape codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe_globals(path: Path) -> str:
    """The globals torch would refuse, for the message (never the workaround torch suggests)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return "contents not listed"
    names = [n for n in names if n != "argparse.Namespace"]
    return "globals " + ", ".join(names[:5]) if names else "contents not listed"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file with normalised keys (:func:`read_checkpoint` +
    :func:`extract_state_dict`)."""
    return extract_state_dict(read_checkpoint(path))


def extract_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a container, keys normalised: DDP ``module.`` stripped and an
    encoder-only file (FastSAM3D's distilled encoder) given the ``image_encoder.`` prefix."""
    sd = tensors_of(obj, lambda v: isinstance(v, torch.Tensor))
    if not sd:
        raise CheckpointError("no tensors found (expected a state dict or 'model_state_dict')")
    odd = [k for k in sd if not isinstance(k, str)]
    if odd:
        raise CheckpointError(
            f"tensor names must be strings; found {odd[0]!r} "
            f"({type(odd[0]).__name__}){' and more' if len(odd) > 1 else ''}"
        )
    return normalise_keys(sd)


def _tensor(
    sd: Mapping[str, torch.Tensor], key: str, ndim: int | None = None, why: str = ""
) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(
            f"missing tensor {key!r}{why}; is this a FastSAM3D / SAM-Med3D checkpoint?"
        )
    if ndim is not None and (t.dim() < ndim or any(n == 0 for n in t.shape[:ndim])):
        raise CheckpointError(
            f"tensor {key!r} has shape {tuple(t.shape)}; expected at least "
            f"{ndim} non-empty dimension(s)"
        )
    return t


def detect_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Which network a state dict holds, from its keys and shapes (a registered
    :class:`ModelConfig`, or a ``custom(...)`` one within :func:`fastsam3d.build.check_config`'s
    bounds; anything else raises CheckpointError before a network is built).

    Block style cannot be seen in weights: 12-block files are reported as ``sam-med3d-turbo``
    (pass ``config="sam-med3d-turbo-fastsam3d-block"`` to run them the FastSAM3D way).
    """
    pre = "image_encoder.blocks."
    blocks: set[int] = set()
    for k in sd:
        if not isinstance(k, str):
            raise CheckpointError(f"tensor names must be strings; found {k!r}")
        if k.startswith(pre):
            head = k[len(pre) :].split(".")[0]
            if not head.isdigit():
                raise CheckpointError(f"key {k!r}: {head!r} is not a block number")
            blocks.add(int(head))
    if not blocks:
        raise CheckpointError("no image-encoder blocks in this file (is it a decoder-only file?)")
    depth = max(blocks) + 1
    gaps = sorted(set(range(depth)) - blocks)
    if gaps:
        raise CheckpointError(
            f"the file has weights for encoder block {depth - 1} but none for blocks "
            f"{gaps[:8]}{' ...' if len(gaps) > 8 else ''} ({len(gaps)} missing): a damaged or "
            "crafted file; refused before building anything"
        )
    attn_free = 0
    while attn_free < depth and f"{pre}{attn_free}.attn.qkv.weight" not in sd:
        attn_free += 1
    embed_dim = _tensor(sd, f"{pre}0.norm2.weight", 1, " (it gives the width)").shape[0]
    windows, globals_ = set(), []
    head_dim = None
    grid = CONFIGS["fastsam3d"].grid
    for b in range(attn_free, depth):
        key = f"{pre}{b}.attn.rel_pos_d"
        if key not in sd:
            continue
        table = _tensor(sd, key, 2)
        rows = table.shape[0]
        if rows % 2 == 0 or (rows + 1) // 2 > MAX_WINDOW:
            raise CheckpointError(
                f"tensor {key!r} has {rows} rows; a relative-position table "
                f"has 2*w-1 rows for a window w of at most {MAX_WINDOW}"
            )
        head_dim = table.shape[1]
        size = (rows + 1) // 2
        if size == grid:
            globals_.append(b)
        else:
            windows.add(size)
    if len(windows) > 1:
        raise CheckpointError(f"inconsistent window sizes in rel-pos tables: {sorted(windows)}")
    if head_dim is not None and embed_dim % head_dim:
        raise CheckpointError(
            f"width {embed_dim} is not a multiple of the head width {head_dim} "
            "given by the rel-pos tables"
        )
    num_heads = embed_dim // head_dim if head_dim else CONFIGS["fastsam3d"].num_heads
    pe = sd.get("prompt_encoder.point_embeddings.3.weight")
    window = windows.pop() if windows else 0
    fields = dict(
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        window_size=window,
        out_chans=_tensor(sd, "image_encoder.neck.0.weight", 1).shape[0],
        global_attn_indexes=tuple(globals_) if window else (),
        num_attn_free_blocks=attn_free,
        num_point_embeddings=4 if pe is not None else 2,
    )
    for cfg in CONFIGS.values():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return cfg
    base = "fastsam3d" if attn_free else "sam-med3d-turbo"
    cfg = dataclasses.replace(CONFIGS[base], name=f"custom({base}-like)", **fields)
    _bounded(cfg)
    return cfg


def _bounded(cfg: ModelConfig) -> None:
    try:
        check_config(cfg)
    except ValueError as exc:
        raise CheckpointError(
            f"the file implies a network outside the supported bounds: {exc}; "
            "refused before building anything"
        ) from None


def _shape_report(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    """Missing / unexpected keys, wrong shapes and non-floating weights, or None if all fit.
    ``model`` may live on the ``meta`` device: only names, shapes and dtypes are read."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if own[k].shape != sd[k].shape
    )
    dtypes = sorted(
        f"{k}: {sd[k].dtype} (the network needs floating-point weights)"
        for k in set(own) & set(sd)
        if own[k].is_floating_point() and (not sd[k].is_floating_point() or sd[k].is_complex())
    )
    if not (missing or unexpected or wrong or dtypes):
        return None

    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:20]) + more

    parts = [
        block(t, i)
        for t, i in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong),
            ("wrong dtypes", dtypes),
        )
        if i
    ]
    return "\n".join(parts)


def _non_finite_report(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Tensors holding NaN or Inf (they give empty masks, silently), named with counts."""
    bad = []
    for k, t in sd.items():
        # A float64 sum of finite float32/16 values cannot overflow, so it is finite exactly
        # when every value is (one cheap pass; counting only for the rare bad tensor).
        if (
            t.is_floating_point()
            and t.numel()
            and not bool(torch.isfinite(t.sum(dtype=torch.float64)))
        ):
            n = int((~torch.isfinite(t)).sum())
            bad.append(f"{k}: {n} of {t.numel()} values are NaN or Inf")
    if not bad:
        return None
    more = f"\n    ... and {len(bad) - 10} more tensors" if len(bad) > 10 else ""
    return "\n".join(f"    {b}" for b in bad[:10]) + more


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
    """A ready model (eval mode, on ``device``) from a checkpoint file or a registered name.

    A string that is a registered weights name (``fastsam3d``, ``sam-med3d-turbo``) always means
    the verified cache entry, even when a file or folder of that name is in the working
    directory; pass ``./fastsam3d`` or a ``Path`` for such a file. The file is read without
    executing code (see :func:`read_checkpoint`) and checked key by key before any weight is
    copied.

    Args:
        path_or_name: A checkpoint file (PyTorch zip or safetensors; the official containers or
            a plain state dict) or a registered weights name (``fastsam3d.list_weights()``),
            downloaded into the per-user cache and verified on first use.
        device: Where the model is placed, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        config: A config name or ``ModelConfig`` that overrides detection from the keys and
            shapes (e.g. run SAM-Med3D weights with FastSAM3D's block).
        decoder: A checkpoint that supplies the prompt encoder and mask decoder for an
            encoder-only file.
        sha256: The file's expected SHA-256, 64 hex digits. Registered names are always verified
            against their recorded hash.
        attn_backend: The encoder's attention backend (``fastsam3d.set_attention_backend``).

    Returns:
        A float32 ``Sam3D`` in eval mode on ``device``; ``model.config`` is the detected or
        given config. Shapes as :func:`fastsam3d.build_model`'s.

    Raises:
        CheckpointError: The file is missing or is not a usable checkpoint (unreadable, not a
            checkpoint, keys or shapes that do not fit the network, non-finite weights), or
            the name is neither a file nor a registered name.
        fastsam3d.hub.HubError: A registered name's download failed or its hash differs.
    """
    from . import hub
    from .weights import WEIGHTS

    registered = isinstance(path_or_name, str) and path_or_name in WEIGHTS
    if registered:
        name = str(path_or_name)
        path = hub.download(name, sha256=sha256)
        sha256 = None  # verified by the hub
        if config is None:
            config = WEIGHTS[name].config
        try:
            return _load_file(path, device, config, decoder, attn_backend)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}\nThe cached {name!r} weights are not usable: re-download them with "
                f"`fastsam3d download {name} --force`"
            ) from None
    path = Path(path_or_name)
    if (
        not os.path.lexists(path)
        and isinstance(path_or_name, str)
        and not any(c in path_or_name for c in "/\\.")
    ):
        names = ", ".join(sorted(WEIGHTS))
        raise CheckpointError(
            f"{path_or_name!r} is neither a file nor a registered weights name ({names})"
        )
    if sha256:
        sniff(path)
        hub.verify_file(path, sha256)
    return _load_file(path, device, config, decoder, attn_backend)


def _load_file(
    path: Path,
    device: str | torch.device,
    config: str | ModelConfig | None,
    decoder: str | os.PathLike[str] | None,
    attn_backend: str,
) -> Sam3D:
    sd, style = load_state_dict_file(path, decoder)
    try:
        cfg = get_config(config) if config is not None else detect_config(sd)
    except ValueError as exc:  # an unknown config name
        raise CheckpointError(str(exc)) from None
    if config is None and style:
        cfg = with_block_style(cfg, style)  # a registered variant keeps its name
    _bounded(cfg)
    has_parts = {p for p in PREFIXES if any(k.startswith(p) for k in sd)}
    if has_parts == {"image_encoder."}:
        raise CheckpointError(
            f"{path} holds only an image encoder ({cfg.summary()}); pass decoder=<file with the "
            "prompt encoder and mask decoder> (e.g. the SAM-Med3D-turbo or FastSAM3D checkpoint)"
        )
    # Keys, shapes and dtypes are compared before the weights are copied. A registered config
    # has a known, sane size: build it for real. Any other config is first checked against a
    # skeleton on the meta device, which allocates nothing (a crafted file naming a custom
    # network cannot make us allocate it).
    if CONFIGS.get(cfg.name) == cfg:
        model = build_model(cfg, attn_backend=attn_backend)
        report = _shape_report(model, sd)
    else:
        with torch.device("meta"):
            report = _shape_report(build_model(cfg, attn_backend=attn_backend), sd)
        model = None
    if report:
        raise CheckpointError(f"{path} does not fit the {cfg.name} network:\n{report}")
    bad = _non_finite_report(sd)
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite weights (they would give empty masks):\n{bad}"
        )
    if model is None:
        model = build_model(cfg, attn_backend=attn_backend)
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
        model_type="vit_b_ori",
        fastsam3d_config=cfg.name if cfg else None,
        block_style=cfg.block_style if cfg else None,
        **metadata,
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
