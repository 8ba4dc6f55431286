"""Deterministic fixture weights: the parity recipe, for tests, demos and offline runs.

A fixture network computes the official architecture exactly but was never trained: its masks
are not segmentations. It exists so that every code path can run without downloading weights.
"""

from __future__ import annotations

import math
import zlib

import torch

from .build import build_model
from .configs import ModelConfig
from .modeling import Sam3D


def recipe_tensor(name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The parity fixture's value for the official key ``name`` (full prefixed key)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if name.endswith("positional_encoding_gaussian_matrix"):
        return t
    if "pos_embed" in name or "rel_pos" in name:
        return 0.02 * t
    if len(shape) == 1 and name.endswith(".weight"):
        return 1 + 0.1 * t
    if len(shape) == 1:
        return 0.02 * t
    return t / math.sqrt(math.prod(shape[1:]))


@torch.no_grad()
def apply_recipe(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every state-dict entry of ``model`` with the recipe value for its key."""
    for name, tensor in model.state_dict().items():
        tensor.copy_(recipe_tensor(name, tensor.shape))
    return model


def fixture_model(
    name: str | ModelConfig = "fastsam3d", device: str | torch.device = "cpu", **overrides: object
) -> Sam3D:
    """A registered network with recipe weights, ready for inference (no download)."""
    return apply_recipe(build_model(name, **overrides)).to(device).eval()
