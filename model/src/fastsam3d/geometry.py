"""Crop sampling and paste-back on PyTorch tensors (any device), on the 1.5 mm lattice of
:mod:`fastsam3d.lattice` (whose names are re-exported here).

:mod:`fastsam3d.resample_numpy` has the same functions on numpy arrays (the torch-free
session); :class:`TorchOps` is the session's seam to these. Index conventions: lattice and crop
indices are voxel centres (integer = centre), tensors are indexed (dim0, dim1, dim2). The
volume array is ``[k, j, i]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .lattice import (
    CROP,
    LOWRES,
    SPACING,
    Lattice,
    _normaliser,
    _region_to_lattice,
    aligned_crop_plan,
    axis_maps,
    box_corners,
    closest_orientation,
    crop_to_volume_grid,
    footprint_box,
    lattice_box_to_region,
)

__all__ = [
    "CROP",
    "LOWRES",
    "SPACING",
    "Lattice",
    "TorchOps",
    "closest_orientation",
    "crop_to_volume_grid",
    "sample_crop",
    "znormalize",
    "upsample_logits",
    "tile_weights",
    "sample_field",
    "axis_maps",
    "footprint",
    "footprint_box",
    "lattice_box_to_region",
    "box_corners",
    "ras_box_mask",
]
_REEXPORTED = (_region_to_lattice,)  # tests and older callers reach it here


def _grid(out_shape: Sequence[int], out_to_norm: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, *out_shape, 3) grid for ``grid_sample``: index of each output voxel -> normalised.

    Built by broadcasting three per-axis ramps (cheap) instead of a full matrix product.
    """
    g = torch.as_tensor(out_to_norm[:3], dtype=torch.float32, device=device)
    ramps = [
        torch.arange(n, dtype=torch.float32, device=device)[:, None] * g[:, d]
        for d, n in enumerate(out_shape)
    ]
    ramps[0] = ramps[0] + g[:, 3]
    grid = (ramps[0][:, None, :] + ramps[1][None, :, :])[:, :, None, :] + ramps[2][None, None]
    return grid.unsqueeze(0)


def _inside(grid: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """Points within half a voxel of the outermost voxel centres (ITK's 'inside buffer')."""
    inside = None
    for comp, dim in enumerate((2, 1, 0)):
        half = 1.0 / max(in_shape[dim] - 1, 1)
        c = grid[..., comp]
        ok = (c >= -1.0 - half) & (c < 1.0 + half)
        inside = ok if inside is None else inside & ok
    return inside


def sample_crop(
    volume: torch.Tensor,
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    start: Sequence[int],
    size: int = CROP,
) -> torch.Tensor:
    """The ``size^3`` crop of the lattice at ``start``, sampled from the original grid.

    ``volume`` is the (1, 1, K, J, I) float tensor on the model's device. Trilinear, border value
    within half a voxel of the volume's edge, 0 beyond it and beyond the whole resampled volume
    (what torchio/ITK + CropOrPad produce). Returns (size, size, size) in (dim0, dim1, dim2).

    The lattice is parallel to the original axes, so this is three 1D interpolations with
    weights computed in float64: a crop point on an original voxel centre gets exactly that
    voxel's value (as ITK does), which matters for the ``x > 0`` mask of the z-normalisation.
    """
    in_shape = tuple(volume.shape[2:])
    m = crop_to_volume_grid(lattice, ijk_to_ras, start)
    aligned = aligned_crop_plan(m, lattice, start, size, in_shape)
    if aligned is None:
        return _sample_crop_grid(volume, lattice, ijk_to_ras, start, size)
    plan, lo, hi = aligned
    dev = volume.device
    x = volume[0, 0][lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for _, q, i0, i1, w, _ in plan:
        shape = [1, 1, 1]
        shape[q] = -1
        wt = torch.as_tensor(w, dtype=torch.float32, device=dev).view(shape)
        sel: list = [slice(None)] * q
        x0 = x[(*sel, torch.as_tensor(i0 - lo[q], device=dev))]
        x1 = x[(*sel, torch.as_tensor(i1 - lo[q], device=dev))]
        x = torch.lerp(x0, x1, wt)
    plan.sort(key=lambda p: p[0])
    out = x.permute(*[p[1] for p in plan])
    inside = [p[5] for p in plan]
    if not all(v.all() for v in inside):
        t = [torch.as_tensor(v, device=dev, dtype=out.dtype) for v in inside]
        out = out * (t[0][:, None, None] * t[1][None, :, None] * t[2][None, None, :])
    return out.contiguous()


def _sample_crop_grid(
    volume: torch.Tensor, lattice: Lattice, ijk_to_ras: np.ndarray, start: Sequence[int], size: int
) -> torch.Tensor:
    in_shape = volume.shape[2:]
    m = _normaliser(in_shape) @ crop_to_volume_grid(lattice, ijk_to_ras, start)
    grid = _grid((size, size, size), m, volume.device)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, 0] * _inside(grid[0], in_shape)


def znormalize(crop: torch.Tensor) -> torch.Tensor:
    """Z-normalise with mean/std over voxels > 0 (the reference's ``ZNormalization(x > 0)``).

    Guards: fewer than two voxels > 0 uses all voxels; a zero std only subtracts the mean,
    so a constant or empty crop gives zeros instead of NaN.
    """
    x = crop.float()
    m = (x > 0).to(x.dtype)
    n = m.sum()
    if n < 2:
        m = torch.ones_like(x)
        n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)  # unbiased, like torch.std in torchio
    std = var.sqrt()
    if not torch.isfinite(std) or std <= 0:
        return x - mean
    return (x - mean) / std


def upsample_logits(low_res: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """(..., 32, 32, 32) logits -> (size^3) trilinear, as the reference's ``F.interpolate``."""
    x = low_res.reshape(1, 1, *low_res.shape[-3:]).float()
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]


def tile_weights(
    size: int = CROP, ramp: int = 32, device: torch.device | None = None
) -> torch.Tensor:
    """Blending weight of each crop voxel: 1 inside, falling linearly over ``ramp`` voxels
    towards every face (never 0), so overlapping crops fade into each other without seams."""
    a = torch.arange(size, dtype=torch.float32, device=device)
    w = torch.clamp(torch.minimum(a + 1, size - a) / ramp, max=1.0)
    return w[:, None, None] * w[None, :, None] * w[None, None, :]


def sample_field(
    field: torch.Tensor,
    field_start: Sequence[int],
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    mode: str = "nearest",
) -> torch.Tensor:
    """Sample a lattice field (C, n0, n1, n2) starting at lattice index ``field_start`` at the
    centres of the original voxels in ``region`` (slices into [k, j, i]).

    Returns (C, nk, nj, ni), border values outside the field (callers mask the footprint
    themselves, see :func:`footprint`). ``mode="nearest"`` is the reference's nearest resample
    back (ITK rounds halves up; so do we); ``"linear"`` gives smoother edges on grids finer
    than 1.5 mm. Separable 1D gathers (fast, exact in float64) when the grids are aligned.
    """
    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode must be 'nearest' or 'linear', not {mode!r}")
    maps = axis_maps(lattice, ijk_to_ras, region)
    if maps is None:
        return _sample_field_grid(field, field_start, lattice, ijk_to_ras, region, mode)
    x = field
    dev = field.device
    # restrict to the part of the field the region reads (a view), then gather the outer axes
    # first (plane/row copies), the innermost last, on the smallest tensor
    plan = []
    for ax in range(3):
        c = maps[ax][1] - field_start[ax]
        n = field.shape[1 + ax]
        if mode == "nearest":
            # exact half-voxel ties (common: 2 mm or 0.75 mm grids vs 1.5 mm) round up, as ITK
            # means to; snapping first keeps float noise from deciding them
            i0 = np.clip(np.floor(np.round(c, 6) + 0.5), 0, n - 1).astype(np.int64)
            i1, w = i0, None
        else:
            c = np.clip(c, 0, n - 1)
            i0 = np.floor(c).astype(np.int64)
            i1 = np.minimum(i0 + 1, n - 1)
            w = c - i0
        plan.append((ax, i0, i1, w))
    if mode == "nearest" and dev.type == "cpu":  # numpy's take is ~4x faster here
        xn = x.numpy()
        for ax, i0, _, _ in reversed(plan):  # innermost first: fastest order measured
            xn = np.take(xn, i0, axis=1 + ax)
        x = torch.from_numpy(xn)
        plan = []
    elif mode == "nearest":  # plain gathers, outer axes first (fastest on GPU)
        for ax, i0, _, _ in plan:
            x = x[(*[slice(None)] * (1 + ax), torch.as_tensor(i0, device=dev))]
        plan = []
    else:
        lo = [int(min(p[1].min(), p[2].min())) for p in plan]
        hi = [int(max(p[1].max(), p[2].max())) + 1 for p in plan]
        x = x[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for ax, i0, i1, w in plan:
        sel: list = [slice(None)] * (1 + ax)
        x0 = x[(*sel, torch.as_tensor(i0 - lo[ax], device=dev))]
        if w is None:
            x = x0
            continue
        shape = [1, 1, 1, 1]
        shape[1 + ax] = -1
        wt = torch.as_tensor(w, dtype=torch.float32, device=dev).view(shape)
        x = torch.lerp(x0.float(), x[(*sel, torch.as_tensor(i1 - lo[ax], device=dev))].float(), wt)
    pos = [0, 0, 0]
    for ax in range(3):
        pos[maps[ax][0]] = ax
    return x.permute(0, 1 + pos[0], 1 + pos[1], 1 + pos[2])


def _sample_field_grid(
    field: torch.Tensor,
    field_start: Sequence[int],
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    mode: str,
) -> torch.Tensor:
    m = _region_to_lattice(lattice, ijk_to_ras, region)
    m[:3, 3] -= np.asarray(field_start, dtype=np.float64)
    out_shape = [s.stop - s.start for s in region]
    grid = _grid(out_shape, _normaliser(field.shape[1:]) @ m, field.device)
    return F.grid_sample(
        field[None].float(),
        grid,
        padding_mode="border",
        mode="bilinear" if mode == "linear" else "nearest",
        align_corners=True,
    )[0]


def footprint(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    starts: Sequence[Sequence[int]],
    device: torch.device,
    size: int = CROP,
) -> torch.Tensor | None:
    """Bool (nk, nj, ni): original voxels of ``region`` whose centre lies inside at least one
    crop (its voxels +/- half a voxel, ITK's inside test) — the only voxels a crop may write.
    None when that is all of them (the common case; saves a pass over the region)."""
    out_shape = [s.stop - s.start for s in region]
    maps = axis_maps(lattice, ijk_to_ras, region)
    result = torch.zeros(out_shape, dtype=torch.bool, device=device)
    if maps is None:
        return _footprint_grid(lattice, ijk_to_ras, region, starts, device, size)
    for st in starts:
        parts = []
        for ax in range(3):
            q, c = maps[ax]
            c = c - st[ax]
            v = torch.as_tensor((c >= -0.5) & (c < size - 0.5), device=device)
            shape = [1, 1, 1]
            shape[q] = -1
            parts.append(v.view(shape))
        if all(bool(p.all()) for p in parts):
            return None
        result |= parts[0] & parts[1] & parts[2]
    return result


def ras_box_mask(
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    lo: Sequence[float],
    hi: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """Bool (nk, nj, ni): voxels of ``region`` whose centre lies in the RAS box [lo, hi] (mm)."""
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in region]
    to_ras = (np.asarray(ijk_to_ras) @ kji_to_ijk @ shift)[[2, 1, 0, 3]]  # comps as _grid's
    shape = [s.stop - s.start for s in region]
    g = _grid(shape, to_ras, device)[0]  # (.., 3) as (S, A, R)
    lo_t = torch.as_tensor(
        np.asarray(lo, dtype=np.float64)[::-1].copy(), dtype=torch.float32, device=device
    )
    hi_t = torch.as_tensor(
        np.asarray(hi, dtype=np.float64)[::-1].copy(), dtype=torch.float32, device=device
    )
    return ((g >= lo_t) & (g <= hi_t)).all(-1)


def _footprint_grid(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    starts: Sequence[Sequence[int]],
    device: torch.device,
    size: int,
) -> torch.Tensor:
    m = _region_to_lattice(lattice, ijk_to_ras, region)
    out_shape = [s.stop - s.start for s in region]
    c = _grid(out_shape, m[[2, 1, 0, 3]], device)[0]  # (.., 3) as (d2, d1, d0)
    result = torch.zeros(out_shape, dtype=torch.bool, device=device)
    for st in starts:
        ok = None
        for comp, dim in enumerate((2, 1, 0)):
            lo = st[dim] - 0.5
            v = (c[..., comp] >= lo) & (c[..., comp] < lo + size)
            ok = v if ok is None else ok & v
        result |= ok
    return result


# --- the session's seam ---------------------------------------------------------------------
class TorchOps:
    """The array operations a :class:`fastsam3d.Session` needs, on torch tensors on
    ``device`` (the runner takes and returns tensors there). Same methods as
    :class:`fastsam3d.resample_numpy.NumpyOps`, which the torch-free session uses."""

    name = "torch"

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def inference(self) -> contextlib.AbstractContextManager:
        return torch.inference_mode()

    def upload(self, array: np.ndarray) -> tuple[torch.Tensor, int, float, float]:
        """(a float32 copy on the device shaped (1, 1, k, j, i), voxels not finite, min, max);
        never shares the caller's memory (an edit would reach crops not yet embedded)."""
        a = array
        if (
            a.dtype
            not in (
                np.float32,
                np.float64,
                np.float16,
                np.int8,
                np.uint8,
                np.int16,
                np.int32,
                np.int64,
            )
            or not a.dtype.isnative
        ):
            a = a.astype(np.float32)  # e.g. uint16/uint32 or big-endian data from files
        elif not a.flags.writeable or (a.dtype == np.float32 and self.device.type == "cpu"):
            a = a.copy()  # torch cannot wrap read-only memory; never share the caller's
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device=self.device, dtype=torch.float32)
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            return t[None, None], int((~finite).sum()), float("nan"), float("nan")
        lo, hi = torch.aminmax(t)
        return t[None, None], 0, float(lo), float(hi)

    def zeros_lowres(self) -> torch.Tensor:
        return torch.zeros(1, 1, LOWRES, LOWRES, LOWRES, device=self.device)

    def points(self, coords: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]

    def labels(self, labels: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor([list(labels)], dtype=torch.long, device=self.device)

    def first_channel(self, low_res: torch.Tensor) -> torch.Tensor:
        return low_res[:, :1].float()

    def all_finite(self, x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    def tile_weights(self) -> torch.Tensor:
        return tile_weights(device=self.device)

    def sample_crop(
        self, volume: torch.Tensor, lattice: Lattice, ijk_to_ras: np.ndarray, start: Sequence[int]
    ) -> torch.Tensor:
        return sample_crop(volume, lattice, ijk_to_ras, start)

    def network_input(self, crop: torch.Tensor) -> torch.Tensor:
        return znormalize(crop)[None, None]

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        return upsample_logits(low_res)

    def upsample_block(self, block: torch.Tensor) -> torch.Tensor:
        """(n0, n1, n2) logits -> (4 n0, 4 n1, 4 n2), as ``F.interpolate(size=4 * n)``."""
        sizes = tuple(int(n) * (CROP // LOWRES) for n in block.shape)
        x = block[None, None].float()
        return F.interpolate(x, size=sizes, mode="trilinear", align_corners=False)[0, 0]

    def positive_bounds(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """Lowest and highest index (3,) of the positive low-res logits; None if none is."""
        pos = logits[0, 0] > 0
        if not bool(pos.any()):
            return None
        idx = torch.nonzero(pos)
        return idx.min(0).values.cpu().numpy(), idx.max(0).values.cpu().numpy()

    def argmax(self, x: torch.Tensor) -> int:
        return int(torch.argmax(x))

    def mask_prompt(self, items: Sequence[tuple[torch.Tensor, np.ndarray]]) -> torch.Tensor:
        """Low-res mask prompt of a new crop (see :func:`fastsam3d.resample_numpy.mask_prompt`)."""
        total = torch.zeros(1, 1, LOWRES, LOWRES, LOWRES, device=self.device)
        count = torch.zeros_like(total)
        knots = torch.arange(LOWRES, dtype=torch.float32, device=self.device) * 4 + 1.5
        for logits, off in items:
            # knot positions of the new crop in the old crop's low-res grid (align_corners=False)
            axes = [((knots + float(off[d])) + 0.5) / CROP * 2 - 1 for d in range(3)]
            g = torch.stack(torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij"), -1)
            g = g.permute(2, 1, 0, 3)[None]  # (1, n0, n1, n2, (x=d2, y=d1, z=d0))
            v = F.grid_sample(
                logits, g, mode="bilinear", padding_mode="border", align_corners=False
            )
            inside = ((g.abs() <= 1).all(-1))[:, None].float()
            total += v * inside
            count += inside
        return torch.where(count > 0, total / count.clamp(min=1), total)

    def blend(
        self,
        parts: Iterable[tuple[tuple[slice, ...], torch.Tensor]],
        shape: Sequence[int],
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted mean of upsampled crop logits placed at ``parts``' slices; -1 where none."""
        num = torch.zeros(tuple(shape), device=self.device)
        den = torch.zeros_like(num)
        for sl, low in parts:
            num[sl] += upsample_logits(low) * weights
            den[sl] += weights
        return torch.where(den > 0, num / den.clamp(min=1e-12), torch.full_like(den, -1.0))

    def sample_field(
        self,
        field: torch.Tensor,
        field_start: Sequence[int],
        lattice: Lattice,
        ijk_to_ras: np.ndarray,
        region: tuple[slice, slice, slice],
        mode: str,
    ) -> torch.Tensor:
        return sample_field(field, field_start, lattice, ijk_to_ras, region, mode)

    def footprint(
        self,
        lattice: Lattice,
        ijk_to_ras: np.ndarray,
        region: tuple[slice, slice, slice],
        starts: Sequence[Sequence[int]],
    ) -> torch.Tensor | None:
        return footprint(lattice, ijk_to_ras, region, starts, self.device)

    def ras_box_mask(
        self,
        ijk_to_ras: np.ndarray,
        region: tuple[slice, slice, slice],
        lo: Sequence[float],
        hi: Sequence[float],
    ) -> torch.Tensor:
        return ras_box_mask(ijk_to_ras, region, lo, hi, self.device)

    def keep_box(self, mask: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
        """``mask`` with everything outside the slices ``box`` cleared."""
        inner = mask[box].clone()
        out = torch.zeros_like(mask)
        out[box] = inner
        return out
