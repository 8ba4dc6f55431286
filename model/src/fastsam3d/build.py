"""The builder: one private builder over the named configs of :mod:`fastsam3d.configs`.

The config names (``ModelConfig``, ``MODEL_CONFIGS``, ``get_config``, ...) and
``set_attention_backend`` are re-exported here, where callers have always found them.
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
    "MAX_DEPTH", "MAX_EMBED_DIM", "MAX_OUT_CHANS", "MAX_WINDOW", "MODEL_CONFIGS", "ModelConfig",
    "build_model", "check_config", "get_config", "list_models", "set_attention_backend",
]


def _build(cfg: ModelConfig) -> Sam3D:
    check_config(cfg)
    g = cfg.grid
    encoder = ImageEncoderViT3D(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.out_chans, window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
        num_attn_free_blocks=cfg.num_attn_free_blocks, block_style=cfg.block_style,
    )
    prompt = PromptEncoder3D(
        embed_dim=cfg.out_chans, image_embedding_size=(g, g, g),
        input_image_size=(cfg.img_size,) * 3, num_point_embeddings=cfg.num_point_embeddings,
    )
    decoder = MaskDecoder3D(transformer_dim=cfg.out_chans)
    return Sam3D(encoder, prompt, decoder, config=cfg)


def build_model(
    name: str | ModelConfig = "fastsam3d", *, attn_backend: str = "sdpa", **overrides: object
) -> Sam3D:
    """A randomly initialised model of a registered config (``fastsam3d.load_model`` loads
    weights). Keyword overrides replace config fields, e.g. ``depth=2, embed_dim=64``."""
    model = _build(get_config(name, **overrides))
    set_attention_backend(model, attn_backend)
    return model.eval()
