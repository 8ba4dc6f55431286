"""The separable click + paste: one click's mask pasted into a region of the original grid,
as one graph (:meth:`fastsam3d.fastpath.Runner.click_then`; a CUDA graph on the fast path).

What ``fastsam3d bench`` times as its ``click+paste`` stage and ``model/benchmarks/gpu_checks.py``
checks; the Session pastes through :mod:`fastsam3d.paste` instead (blending, boxes, tiles).
A crop's voxels map to the original grid separably (the 1.5 mm lattice keeps every voxel
axis's direction), so the paste is three 1-D gathers prepared on the host (:class:`PastePlan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import geometry as geo
from .fastpath import Runner

PASTE_MODES = ("nearest", "linear")


@dataclass(frozen=True)
class PastePlan:
    """Where a crop's voxels land in a region of the original grid, prepared on the host.

    ``axes[a]`` is the region axis that crop axis ``a`` runs along (the 1.5 mm lattice keeps
    every voxel axis's direction, so the map is separable); ``tensors`` holds per crop axis
    (i0, i1, w, inside) over that region axis: the two neighbouring crop voxels, the linear
    weight, and whether the voxel centre lies in the crop (+/- half a voxel). Nearest rounds
    halves up (ITK's rule), as :func:`fastsam3d.geometry.sample_field` does.
    """

    axes: tuple[int, int, int]
    shape: tuple[int, int, int]
    mode: str
    tensors: tuple[torch.Tensor, ...]


def paste_plan(
    maps: Sequence[tuple[int, np.ndarray]],
    size: int = 128,
    mode: str = "nearest",
    device: torch.device | str = "cpu",
) -> PastePlan:
    """Build a :class:`PastePlan` from per-crop-axis ``(region axis, crop coordinates of the
    region's voxels along it)`` in float64 — ``fastsam3d.geometry.axis_maps`` minus the crop
    start."""
    if mode not in PASTE_MODES:
        raise ValueError(f"paste mode must be one of {PASTE_MODES}, not {mode!r}")
    axes = tuple(int(q) for q, _ in maps)
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"maps must name each region axis once, got {axes}")
    shape = [0, 0, 0]
    parts: list[torch.Tensor] = []
    for q, c in maps:
        c = np.asarray(c, dtype=np.float64)
        shape[q] = len(c)
        if mode == "nearest":
            i0 = np.clip(np.floor(c + 0.5), 0, size - 1)
            i1, w = i0, np.zeros_like(c)
        else:
            cc = np.clip(c, 0, size - 1)
            i0 = np.floor(cc)
            i1, w = np.minimum(i0 + 1, size - 1), cc - i0
        inside = (c >= -0.5) & (c < size - 0.5)
        parts += [
            torch.as_tensor(i0.astype(np.int64), device=device),
            torch.as_tensor(i1.astype(np.int64), device=device),
            torch.as_tensor(w, dtype=torch.float32, device=device),
            torch.as_tensor(inside, device=device),
        ]
    return PastePlan(axes, tuple(shape), mode, tuple(parts))  # type: ignore[arg-type]


def paste_field(
    field: torch.Tensor, axes: Sequence[int], mode: str, tensors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """(S, S, S) crop logits -> bool mask of the plan's region: separable gathers, threshold
    at 0, and only voxels inside the crop's footprint may be set.

    The crop is put in the region's axis order first (a copy of S^3 voxels, fewer than the
    region's), so the result needs no permuted copy; nearest selections commute, so they run
    shrinking axes first; the linear blends keep the crop-axis order (same rounding as ever).
    """
    nearest = mode == "nearest"
    pos = [0, 0, 0]
    for a in range(3):
        pos[axes[a]] = a
    x = (field > 0 if nearest else field.float()).permute(*pos).contiguous()
    order = sorted(range(3), key=lambda a: len(tensors[4 * a])) if nearest else range(3)
    inside = None
    for a in order:
        d = axes[a]
        i0, i1, w, ok = tensors[4 * a : 4 * a + 4]
        if nearest:
            x = _take(x, d, i0)
        else:
            shape = [1, 1, 1]
            shape[d] = -1
            x0 = _take(x, d, i0)
            x = x0 + (_take(x, d, i1) - x0) * w.view(shape)
        view = [1, 1, 1]
        view[d] = -1
        inside = ok.view(view) if inside is None else inside & ok.view(view)
    if not nearest:
        x = x > 0
    return x & inside


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)``; along the last (contiguous) axis as a gather, which a
    CPU runs ~5-10x faster there (index_select copies one element at a time)."""
    if dim < x.dim() - 1:
        return x.index_select(dim, index)
    shape = list(x.shape)
    shape[dim] = index.numel()
    return torch.gather(x, dim, index.expand(shape))


def click_and_paste(
    runner: Runner,
    embedding: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_input: torch.Tensor | None,
    plan: PastePlan,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One click pasted into a region of the original volume, as one captured graph.

    ``plan`` (:func:`paste_plan`) says where the crop lands in the region. Returns
    (low-res logits, iou, bool mask of ``plan.shape`` on the device); the mask is the first
    output mask thresholded at 0. One graph per region shape and axis order: keep the
    region fixed per crop (e.g. the crop's whole footprint) to replay it click after click.
    """
    size = runner.model.image_encoder.img_size

    def post(low: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        field = geo.upsample_logits(low[:1, :1], size)
        return paste_field(field, plan.axes, plan.mode, tensors)

    return runner.click_then(
        embedding,
        coords,
        labels,
        mask_input,
        post,
        plan.tensors,
        (plan.shape, plan.axes, plan.mode),
        multimask_output,
    )


def crop_footprint(
    lattice: geo.Lattice,
    ijk_to_ras: np.ndarray,
    start: tuple[int, int, int],
    shape_kji: tuple[int, ...],
    mode: str = "nearest",
    device: torch.device | str = "cpu",
) -> tuple[tuple[slice, ...], PastePlan]:
    """The region of the original grid a crop covers, and the plan to paste into it.

    A fixed region per crop is what lets the click + paste graph replay click after click.
    """
    size = geo.CROP
    lo = np.asarray(start, dtype=np.float64) - 0.5
    region = geo.lattice_box_to_region(lattice, ijk_to_ras, lo, lo + size, shape_kji)
    if region is None:
        raise ValueError("crop does not overlap the volume")
    m = geo._region_to_lattice(lattice, ijk_to_ras, region)
    a = m[:3, :3]
    q = np.argmax(np.abs(a), axis=1)
    maps = []
    for ax in range(3):
        n = region[q[ax]].stop - region[q[ax]].start
        c = a[ax, q[ax]] * np.arange(n, dtype=np.float64) + m[ax, 3] - start[ax]
        maps.append((int(q[ax]), c))
    return region, paste_plan(maps, size, mode, device)
