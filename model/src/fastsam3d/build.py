"""The builder: one private builder over the named configs of :mod:`fastsam3d.configs`.

The config names (``ModelConfig``, ``MODEL_CONFIGS``, ``get_config``, ...) and
``set_attention_backend`` are re-exported here, where callers have always found them; new code
imports them from :mod:`fastsam3d.configs` (``CONFIGS``, ``list_configs``, ``get_config``).
"""

from __future__ import annotations

from .configs import (
    MAX_DEPTH,
    MAX_EMBED_DIM,
    MAX_OUT_CHANS,
    MAX_WINDOW,
    MODEL_CONFIGS,
    ModelConfig,
    check_config,
    get_config,
    list_models,
)
from .modeling import ImageEncoderViT3D, MaskDecoder3D, PromptEncoder3D, Sam3D
from .modeling.attention import set_attention_backend

__all__ = [
    "MAX_DEPTH",
    "MAX_EMBED_DIM",
    "MAX_OUT_CHANS",
    "MAX_WINDOW",
    "MODEL_CONFIGS",
    "ModelConfig",
    "build_model",
    "check_config",
    "get_config",
    "list_models",
    "set_attention_backend",
]


def _build(cfg: ModelConfig) -> Sam3D:
    check_config(cfg)
    g = cfg.grid
    encoder = ImageEncoderViT3D(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.out_chans,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
        num_attn_free_blocks=cfg.num_attn_free_blocks,
        block_style=cfg.block_style,
    )
    prompt = PromptEncoder3D(
        embed_dim=cfg.out_chans,
        image_embedding_size=(g, g, g),
        input_image_size=(cfg.img_size,) * 3,
        num_point_embeddings=cfg.num_point_embeddings,
    )
    decoder = MaskDecoder3D(transformer_dim=cfg.out_chans)
    return Sam3D(encoder, prompt, decoder, config=cfg)


def build_model(
    name: str | ModelConfig = "fastsam3d", *, attn_backend: str = "sdpa", **overrides: object
) -> Sam3D:
    """A randomly initialised network of a registered config, in eval mode on the CPU.

    For shapes, tests and distillation students; :func:`fastsam3d.load_model` loads weights.

    Args:
        name: A registered config name (``fastsam3d.configs.CONFIGS``) or a ``ModelConfig``.
        attn_backend: The encoder's attention backend (``fastsam3d.set_attention_backend``):
            ``"einsum"``, ``"sdpa"``, ``"fold"``, ``"flex"`` or ``"sparse"``.
        **overrides: Config fields to replace, e.g. ``depth=2, embed_dim=64`` for a tiny
            network.

    Returns:
        A ``Sam3D`` whose ``state_dict()`` has the official keys and whose ``config`` is the
        resolved ``ModelConfig``. Its image encoder maps a (B, 1, S, S, S) float32 crop
        (``S = config.img_size`` voxels of 1.5 mm) to (B, out_chans, S/p, S/p, S/p)
        embeddings (``p = config.patch_size``); its mask decoder returns (B, C, 4S/p, 4S/p,
        4S/p) low-res mask logits and (B, C) IoU estimates, C = 1 or 3.

    Raises:
        ValueError: An unknown config name or backend, or a config outside
            ``fastsam3d.configs.check_config``'s bounds.
    """
    model = _build(get_config(name, **overrides))
    set_attention_backend(model, attn_backend)
    return model.eval()
