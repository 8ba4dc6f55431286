"""Named model configurations: the frozen ``ModelConfig``, the registry of named configs and
their bounds.

Both registries of the package follow one pattern: a public dict, ``list_*()`` for its entries
in registration order and ``get_*(name)`` for one (unknown names raise ValueError listing the
known ones): ``CONFIGS`` / :func:`list_configs` / :func:`get_config` here, ``WEIGHTS`` /
``list_weights`` / ``get_weights`` in :mod:`fastsam3d.weights` (the published checkpoints).

A leaf module without torch: the networks (``modeling``), the builder (``build``), checkpoint
detection (``checkpoint``) and the fixture weights (``testing``) import it, and it imports none
of them, so the model layer never points up at the builder. ``fastsam3d.build`` re-exports
the names it always had (``MODEL_CONFIGS``, ``list_models``, ``get_config`` ...).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides a network's shapes and forward math.

    ``point_policy`` records how the model's decoder was trained to see clicks (the session
    follows it): ``"newest"`` = only the newest click plus the previous low-res logits
    (FastSAM3D's fine-tuning and evaluation loops), ``"accumulate"`` = every click so far plus
    the previous logits (SAM-Med3D's current inference and training with multi-click).
    """

    name: str
    depth: int = 12
    embed_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    num_attn_free_blocks: int = 0
    block_style: str = "standard"
    img_size: int = 128
    patch_size: int = 16
    out_chans: int = 384
    num_point_embeddings: int = 2
    point_policy: str = "accumulate"
    description: str = ""

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def summary(self) -> str:
        attn = self.depth - self.num_attn_free_blocks
        win = (
            f"window {self.window_size} except blocks {list(self.global_attn_indexes)}"
            if self.window_size
            else "global attention"
        )
        return (
            f"{self.name}: {self.depth} blocks ({self.num_attn_free_blocks} attention-free, "
            f"{attn} with {win}), width {self.embed_dim}, {self.num_heads} heads, "
            f"block style {self.block_style!r}"
        )


CONFIGS: dict[str, ModelConfig] = {
    "fastsam3d": ModelConfig(
        name="fastsam3d",
        depth=6,
        num_heads=6,
        window_size=0,
        global_attn_indexes=(),
        num_attn_free_blocks=2,
        block_style="fastsam3d",
        point_policy="newest",
        description="FastSAM3D distilled encoder (6 blocks, 2 attention-free) + SAM-Med3D decoder",
    ),
    "sam-med3d-turbo": ModelConfig(
        name="sam-med3d-turbo",
        point_policy="accumulate",
        description="SAM-Med3D(-turbo) ViT-B, standard pre-norm blocks (the SAM-Med3D code)",
    ),
    "sam-med3d-turbo-fastsam3d-block": ModelConfig(
        name="sam-med3d-turbo-fastsam3d-block",
        block_style="fastsam3d",
        point_policy="accumulate",
        description="SAM-Med3D weights run through FastSAM3D's block (FastSAM3D's teacher and "
        "its Slicer plugin)",
    ),
}

#: The old name of :data:`CONFIGS` (``fastsam3d.build`` exported it); the same dict.
MODEL_CONFIGS = CONFIGS

#: Registered configs that run the same weights with the other block style, spelled out:
#: ``(config name, block style) -> config name``. The block style cannot be seen in the weights;
#: our exporters record it, and a loader uses this map to name the config it then runs.
BLOCK_STYLE_VARIANTS: dict[tuple[str, str], str] = {
    ("sam-med3d-turbo", "fastsam3d"): "sam-med3d-turbo-fastsam3d-block",
    ("sam-med3d-turbo-fastsam3d-block", "standard"): "sam-med3d-turbo",
}


#: Bounds on any config (above all one detected from a file): generous for ViT-B..H-sized
#: encoders, tight enough that a crafted few-KB checkpoint cannot make the builder allocate
#: gigabytes (a 100000-block or 65538-wide network).
MAX_DEPTH = 64
MAX_EMBED_DIM = 2048
MAX_OUT_CHANS = 1024
MAX_WINDOW = 32


def check_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first field outside the supported bounds."""
    problems = []
    if not 1 <= cfg.depth <= MAX_DEPTH:
        problems.append(f"depth {cfg.depth} (1..{MAX_DEPTH})")
    if not 1 <= cfg.embed_dim <= MAX_EMBED_DIM:
        problems.append(f"width {cfg.embed_dim} (1..{MAX_EMBED_DIM})")
    if cfg.num_heads < 1 or cfg.embed_dim % cfg.num_heads:
        problems.append(f"{cfg.num_heads} heads for width {cfg.embed_dim} (must divide it)")
    if not 1 <= cfg.out_chans <= MAX_OUT_CHANS:
        problems.append(f"out_chans {cfg.out_chans} (1..{MAX_OUT_CHANS})")
    if not 0 <= cfg.window_size <= MAX_WINDOW:
        problems.append(f"window {cfg.window_size} (0..{MAX_WINDOW})")
    if not 0 <= cfg.num_attn_free_blocks <= cfg.depth:
        problems.append(f"{cfg.num_attn_free_blocks} attention-free blocks of {cfg.depth}")
    if any(not 0 <= i < cfg.depth for i in cfg.global_attn_indexes):
        problems.append(f"global attention blocks {list(cfg.global_attn_indexes)}")
    if not 0 < cfg.mlp_ratio <= 8:
        problems.append(f"mlp_ratio {cfg.mlp_ratio} (0..8]")
    if (
        cfg.patch_size < 1
        or cfg.img_size < 1
        or cfg.img_size % cfg.patch_size
        or cfg.img_size > 512
    ):
        problems.append(f"img_size {cfg.img_size} / patch_size {cfg.patch_size}")
    if cfg.block_style not in ("fastsam3d", "standard"):
        problems.append(f"block style {cfg.block_style!r} ('fastsam3d' or 'standard')")
    if cfg.point_policy not in ("newest", "accumulate"):
        problems.append(f"point policy {cfg.point_policy!r} ('newest' or 'accumulate')")
    if not 1 <= cfg.num_point_embeddings <= 8:
        problems.append(f"num_point_embeddings {cfg.num_point_embeddings} (1..8)")
    if problems:
        raise ValueError(f"config {cfg.name!r}: " + "; ".join(problems))


def list_configs() -> list[ModelConfig]:
    """All registered configs, in registration order (``config.name`` is the registry key)."""
    return list(CONFIGS.values())


def list_models() -> list[str]:
    """Deprecated: the sorted config names, ``sorted(CONFIGS)``; use :func:`list_configs`."""
    warnings.warn(
        "fastsam3d.list_models() is deprecated; use fastsam3d.list_configs() (the configs) or "
        "sorted(fastsam3d.configs.CONFIGS) (their names)",
        DeprecationWarning,
        stacklevel=2,
    )
    return sorted(CONFIGS)


def get_config(name: str | ModelConfig, **overrides: object) -> ModelConfig:
    """A registered config, optionally with fields replaced (tiny test/distillation students)."""
    if isinstance(name, ModelConfig):
        cfg = name
    else:
        try:
            cfg = CONFIGS[name]
        except KeyError:
            known = ", ".join(sorted(CONFIGS))
            raise ValueError(f"unknown model {name!r}; known: {known}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def with_block_style(cfg: ModelConfig, block_style: str) -> ModelConfig:
    """``cfg`` run with ``block_style``: its registered variant (:data:`BLOCK_STYLE_VARIANTS`)
    if there is one, else a copy of ``cfg`` with the style replaced (same name)."""
    if cfg.block_style == block_style:
        return cfg
    variant = BLOCK_STYLE_VARIANTS.get((cfg.name, block_style))
    if variant is not None and CONFIGS[cfg.name] == cfg:
        return CONFIGS[variant]
    return dataclasses.replace(cfg, block_style=block_style)
