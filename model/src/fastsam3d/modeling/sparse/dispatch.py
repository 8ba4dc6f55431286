"""``sparse_attention``: picks the implementation a pattern runs with and calls it."""

from __future__ import annotations

import functools
import math

import torch

from ..rel_pos import Grid
from .common import Terms, check_terms, needs_grad, reference_attention, terms_list
from .flex import sparse_flex, sparse_flex_union
from .grouped import flash_group_kernel, flash_unsupported_reason, sparse_grouped
from .pattern import SparsePattern


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(pattern: SparsePattern, q: torch.Tensor, grid: Grid) -> str:
    """The implementation ``pattern`` runs with for this input (see the package docstring)."""
    if pattern.impl != "auto":
        return pattern.impl
    if q.device.type == "cuda":
        if flash_available() and flash_unsupported_reason(pattern, grid, q.shape[-1]) is None:
            return "flash"
        return "flex"
    return "einsum"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: Terms | None,
    scale: float,
    grid: Grid,
    pattern: SparsePattern | None = None,
) -> torch.Tensor:
    """Attention over the union mask of ``pattern`` with the official rel-pos bias.

    q, k, v: (B, heads, N, hd) in raster order of ``grid``; returns (B, heads, N, hd).
    """
    pattern = SparsePattern() if pattern is None else pattern
    if not isinstance(pattern, SparsePattern):
        raise TypeError(
            f"sparse attention needs a SparsePattern, got {type(pattern).__name__}; "
            "e.g. SparsePattern(((4, 1), (0, 2)))"
        )
    check_terms(terms, grid)
    if q.shape[2] != math.prod(grid):
        raise ValueError(f"{q.shape[2]} tokens do not fill grid {grid}")
    impl = resolve_impl(pattern, q, grid)
    cpu_grad = q.device.type == "cpu" and needs_grad(q, k, v, *terms_list(terms))
    if impl == "einsum" or (impl in ("flex", "flex_union") and cpu_grad):
        mask = _mask_cached(pattern.branches, grid, q.device)
        return reference_attention(q, k, v, terms, scale, mask)
    if impl == "flex":
        return sparse_flex(q, k, v, terms, scale, grid, pattern)
    if impl == "flex_union":
        return sparse_flex_union(q, k, v, terms, scale, grid, pattern)
    if impl == "flash":
        if not flash_available():
            raise ImportError(
                "SparsePattern(impl='flash') needs the flash_attn package; "
                "install it or use impl='flex' / 'auto'"
            )
        return sparse_grouped(q, k, v, terms, scale, grid, pattern, flash_group_kernel)
    raise ValueError(f"unknown sparse impl {impl!r}")


@torch.compiler.disable  # built once per shape, outside any compiled graph
@functools.lru_cache(maxsize=32)
def _mask_cached(branches: tuple, grid: Grid, device: torch.device) -> torch.Tensor:
    return SparsePattern(branches).mask(grid, device)
