"""The 3D block-sparse pattern: a union of ``(block, dilation)`` branches (see the package
docstring), its token groups and masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..rel_pos import Grid

# Per axis (block, dilation) after clipping to the grid.
AxisRule = tuple[int, int]
Structure = tuple[AxisRule, AxisRule, AxisRule]
IMPLS = ("auto", "einsum", "flex", "flex_union", "flash")


@dataclass(frozen=True)
class SparsePattern:
    """A 3D block-sparse attention pattern: the union of ``(block, dilation)`` branches.

    The default is the paper figure's (segment, dilation) pairs (4,1), (8,2), (16,4), read per
    axis: dense 4^3 cubes, the stride-2 sub-grid of each 8^3 cube, the stride-4 sub-grid of
    each 16^3 cube (blocks larger than the grid are clipped to it). On the 8^3 token grid of a
    128^3 crop that is 120 of 512 keys per query (23%); on 16^3, 176 of 4096 (4.3%).
    """

    branches: tuple[tuple[int, int], ...] = ((4, 1), (8, 2), (16, 4))
    impl: str = "auto"
    # FlexAttention BlockMask tile (tokens). 128 is flex's default; 64 matches 4^3 groups.
    flex_block: int = 128

    def __post_init__(self) -> None:
        branches = tuple(tuple(int(x) for x in br) for br in self.branches)
        object.__setattr__(self, "branches", branches)
        if not branches:
            raise ValueError("SparsePattern needs at least one (block, dilation) branch")
        for br in branches:
            if len(br) != 2 or br[0] < 0 or br[1] < 1:
                raise ValueError(
                    f"SparsePattern branch {br} must be (block >= 0, dilation >= 1); "
                    "block 0 means the whole axis"
                )
        if len(branches) > 8:
            raise ValueError(f"SparsePattern has {len(branches)} branches; at most 8 supported")
        if self.flex_block < 16 or self.flex_block & (self.flex_block - 1):
            raise ValueError(f"flex_block must be a power of two >= 16, got {self.flex_block}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown sparse impl {self.impl!r}; use one of {IMPLS}")

    def rules(self, grid: Grid) -> list[Structure]:
        """Per branch, the per-axis (block, dilation) clipped to ``grid``."""
        return [tuple(_clip_rule(b, r, g) for g in grid) for b, r in self.branches]

    def group_ids(self, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
        """(branches, N) int64: the group of every raster-order token in every branch."""
        return torch.stack([_group_id(rule, grid, device) for rule in self.rules(grid)])

    def mask(self, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N, N) bool, True where query (row) may attend key (column); raster token order."""
        gid = self.group_ids(grid, device)
        return (gid[:, :, None] == gid[:, None, :]).any(0)

    def keys_per_query(self, grid: Grid) -> torch.Tensor:
        """(N,) number of keys each query attends (row sums of :meth:`mask`, chunked)."""
        gid = self.group_ids(grid)
        n = gid.shape[1]
        counts = torch.empty(n, dtype=torch.int64)
        for s in range(0, n, 1024):
            rows = gid[:, s : s + 1024]
            counts[s : s + 1024] = (rows[:, :, None] == gid[:, None, :]).any(0).sum(-1)
        return counts

    def density(self, grid: Grid) -> float:
        """Fraction of the N^2 query-key pairs that are attended."""
        n = math.prod(grid)
        return float(self.keys_per_query(grid).sum()) / (n * n)

    def describe(self, grid: Grid | None = None) -> str:
        parts = []
        for b, r in self.branches:
            where = "the whole grid" if b == 0 else f"each {b}^3 block"
            parts.append(
                f"({b},{r}): "
                + (f"dense in {where}" if r == 1 else f"stride-{r} sub-grid of {where}")
            )
        text = "3D sparse attention, union of " + "; ".join(parts) + f" [impl={self.impl}]"
        if grid is not None:
            kpq = self.keys_per_query(grid).float().mean().item()
            text += (
                f"; on {grid[0]}x{grid[1]}x{grid[2]}: {kpq:.1f} of {math.prod(grid)} keys "
                f"per query ({100 * self.density(grid):.2f}%)"
            )
        return text

    def __str__(self) -> str:
        return self.describe()


def _clip_rule(block: int, dilation: int, size: int) -> AxisRule:
    b = size if block == 0 else min(block, size)
    return b, min(dilation, b)


def _axis_group(rule: AxisRule, size: int, device: torch.device | str) -> torch.Tensor:
    b, r = rule
    c = torch.arange(size, device=device)
    return (c // b) * r + (c % b) % r


def _group_id(rule: Structure, grid: Grid, device: torch.device | str) -> torch.Tensor:
    gd, gh, gw = (_axis_group(rl, s, device) for rl, s in zip(rule, grid))
    nh, nw = int(gh.max()) + 1, int(gw.max()) + 1
    return ((gd[:, None, None] * nh + gh[None, :, None]) * nw + gw[None, None, :]).flatten()


def token_coords(grid: Grid, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    d, h, w = grid
    t = torch.arange(d * h * w, device=device)
    return t // (h * w), (t // w) % h, t % w
