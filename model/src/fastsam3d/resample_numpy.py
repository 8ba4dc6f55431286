"""Crop sampling and paste-back on numpy arrays: the torch-free twin of :mod:`fastsam3d.geometry`.

Same functions, same conventions, same maths (trilinear with ITK's border rule for crops, the
reference's ``F.interpolate`` for logits, nearest or linear sampling back onto the original
voxels), so that a :class:`fastsam3d.Session` on a torch-free runner (ONNX Runtime) gives the
masks the PyTorch path gives; only float32 rounding differs. :class:`NumpyOps` is the session's
seam to these (``TorchOps`` in :mod:`fastsam3d.geometry` is the PyTorch one). Needs numpy only.

Every lattice built by :meth:`Lattice.for_volume` is parallel to the original voxel axes, so
each resampling is three exact 1D maps; the general (non-separable) fallbacks exist for maps
that are not, like the PyTorch module's ``grid_sample`` fallbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .lattice import (
    CROP,
    LOWRES,
    Lattice,
    _region_to_lattice,
    aligned_crop_plan,
    axis_maps,
    crop_to_volume_grid,
)

__all__ = [
    "NumpyOps",
    "sample_crop",
    "znormalize",
    "upsample_logits",
    "upsample_block",
    "tile_weights",
    "sample_field",
    "footprint",
    "ras_box_mask",
    "mask_prompt",
]

KNOT = CROP // LOWRES  # lattice voxels per low-res logit
_F32 = np.float32


def _lerp(x0: np.ndarray, x1: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x0 + w * (x1 - x0)`` in float32: exactly ``x0`` where ``w`` is 0 (a voxel centre)."""
    return x0 + w * (x1 - x0)


def _along(w: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(w, dtype=_F32).reshape(shape)


def _coords(m: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """(*out_shape, 3) float64: ``m`` (4x4) applied to every output index (three ramps)."""
    r = [np.arange(n, dtype=np.float64) for n in out_shape]
    out = np.empty((*out_shape, 3), dtype=np.float64)
    for c in range(3):
        out[..., c] = (m[c, 0] * r[0][:, None, None] + m[c, 1] * r[1][None, :, None]) + (
            m[c, 2] * r[2][None, None, :] + m[c, 3]
        )
    return out


def _interpolate(x: np.ndarray, coords: np.ndarray, mode: str) -> np.ndarray:
    """Sample the last three axes of ``x`` at index coordinates (..., 3), border padding
    (coordinates clamped to the outermost centres); the general, non-separable path."""
    shape = x.shape[-3:]
    c = np.stack([np.clip(coords[..., d], 0, shape[d] - 1) for d in range(3)], -1)
    if mode == "nearest":
        i = np.floor(c + 0.5).astype(np.int64)
        for d in range(3):
            np.minimum(i[..., d], shape[d] - 1, out=i[..., d])
        return x[..., i[..., 0], i[..., 1], i[..., 2]]
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, np.asarray(shape) - 1)
    w = (c - i0).astype(_F32)
    out = np.zeros(x.shape[:-3] + coords.shape[:-1], dtype=_F32)
    for corner in range(8):
        bits = [(corner >> (2 - d)) & 1 for d in range(3)]
        idx = [i1[..., d] if b else i0[..., d] for d, b in enumerate(bits)]
        wt = np.ones(coords.shape[:-1], dtype=_F32)
        for d, b in enumerate(bits):
            wt = wt * (w[..., d] if b else 1 - w[..., d])
        out += wt * x[..., idx[0], idx[1], idx[2]].astype(_F32)
    return out


def _inside(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Points within half a voxel of the outermost voxel centres (ITK's 'inside buffer')."""
    ok = np.ones(coords.shape[:-1], dtype=bool)
    for d in range(3):
        ok &= (coords[..., d] >= -0.5) & (coords[..., d] < shape[d] - 0.5)
    return ok


# --- crops ----------------------------------------------------------------------------------
def sample_crop(
    volume: np.ndarray,
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    start: Sequence[int],
    size: int = CROP,
) -> np.ndarray:
    """The ``size^3`` crop of the lattice at ``start`` from the (1, 1, K, J, I) float32 volume:
    :func:`fastsam3d.geometry.sample_crop` on numpy (trilinear, border value within half a voxel
    of the edge, 0 beyond it and beyond the whole resampled volume)."""
    x = volume[0, 0]
    in_shape = x.shape
    m = crop_to_volume_grid(lattice, ijk_to_ras, start)
    aligned = aligned_crop_plan(m, lattice, start, size, in_shape)
    if aligned is None:
        c = _coords(m, (size,) * 3)
        return _interpolate(x, c, "linear") * _inside(c, in_shape)
    plan, lo, hi = aligned
    x = x[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for _, q, i0, i1, w, _ in plan:
        x = _lerp(np.take(x, i0 - lo[q], axis=q), np.take(x, i1 - lo[q], axis=q), _along(w, q, 3))
    plan.sort(key=lambda p: p[0])
    out = x.transpose(*[p[1] for p in plan])
    inside = [p[5] for p in plan]
    if not all(v.all() for v in inside):
        out = out * (inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
    return np.ascontiguousarray(out, dtype=_F32)


def znormalize(crop: np.ndarray) -> np.ndarray:
    """Z-normalise with mean/std over voxels > 0 (unbiased std), the guards of
    :func:`fastsam3d.geometry.znormalize`; sums in float64, result float32."""
    x = np.asarray(crop, dtype=_F32)
    m = x > 0
    n = int(np.count_nonzero(m))
    if n < 2:
        m = np.ones(x.shape, dtype=bool)
        n = m.size
    vals = x[m].astype(np.float64)
    mean = vals.sum() / n
    var = ((vals - mean) ** 2).sum() / (n - 1)
    std = np.sqrt(var)
    if not np.isfinite(std) or std <= 0:
        return (x - _F32(mean)).astype(_F32)
    return ((x - _F32(mean)) / _F32(std)).astype(_F32)


# --- logits ---------------------------------------------------------------------------------
def _upsample_axis(x: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Linear upsampling by ``factor`` along ``axis``, ``align_corners=False`` (PyTorch's rule:
    source = (dst + 0.5) / factor - 0.5, clamped at 0, the last sample repeated)."""
    n = x.shape[axis]
    src = np.maximum((np.arange(n * factor, dtype=np.float64) + 0.5) / factor - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = _along(src - i0, axis, x.ndim)
    return (1 - w) * np.take(x, i0, axis=axis) + w * np.take(x, i1, axis=axis)


def upsample_block(block: np.ndarray, factor: int = KNOT) -> np.ndarray:
    """(n0, n1, n2) logits -> (factor * n) trilinear, as ``F.interpolate(size=factor * n)``."""
    x = np.asarray(block, dtype=_F32)
    for axis in (2, 1, 0):  # the smallest intermediate first
        x = _upsample_axis(x, axis, factor)
    return x


def upsample_logits(low_res: np.ndarray, size: int = CROP) -> np.ndarray:
    """(..., 32, 32, 32) logits -> (size^3) trilinear, as the reference's ``F.interpolate``."""
    x = np.asarray(low_res, dtype=_F32).reshape(low_res.shape[-3:])
    if size % x.shape[0] or any(s != x.shape[0] for s in x.shape):
        raise ValueError(f"upsample_logits needs a cube and a multiple size, got {x.shape}->{size}")
    return upsample_block(x, size // x.shape[0])


def tile_weights(size: int = CROP, ramp: int = 32, device: Any = None) -> np.ndarray:
    """Blending weight of each crop voxel (see :func:`fastsam3d.geometry.tile_weights`)."""
    a = np.arange(size, dtype=_F32)
    w = np.minimum(np.minimum(a + 1, size - a) / _F32(ramp), _F32(1.0))
    return w[:, None, None] * w[None, :, None] * w[None, None, :]


def mask_prompt(items: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Low-res mask prompt of a new crop from ``(logits (1, 1, 32, 32, 32), offset (3,))`` of
    the crops overlapping it (offset = new start - old start, lattice voxels): each old crop's
    logits sampled at the new knots (``grid_sample`` bilinear, border, ``align_corners=False``),
    averaged where they overlap it, 0 elsewhere."""
    total = np.zeros((LOWRES,) * 3, dtype=_F32)
    count = np.zeros_like(total)
    knots = np.arange(LOWRES, dtype=_F32) * KNOT + _F32(1.5)
    for logits, off in items:
        v = np.asarray(logits, dtype=_F32).reshape((LOWRES,) * 3)
        inside = np.ones((LOWRES,) * 3, dtype=_F32)
        for d in range(3):
            g = ((knots + _F32(off[d])) + _F32(0.5)) / _F32(CROP) * _F32(2) - _F32(1)
            c = np.clip(((g + 1) * LOWRES - 1) / 2, 0, LOWRES - 1)
            i0 = np.floor(c).astype(np.int64)
            i1 = np.minimum(i0 + 1, LOWRES - 1)
            v = _lerp(np.take(v, i0, axis=d), np.take(v, i1, axis=d), _along(c - i0, d, 3))
            inside = inside * _along(np.abs(g) <= 1, d, 3)
        total += v * inside
        count += inside
    out = np.where(count > 0, total / np.maximum(count, 1), total)
    return out.reshape(1, 1, *out.shape).astype(_F32)


# --- back onto the original grid ------------------------------------------------------------
def sample_field(
    field: np.ndarray,
    field_start: Sequence[int],
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    mode: str = "nearest",
) -> np.ndarray:
    """A lattice field (C, n0, n1, n2) starting at lattice index ``field_start`` sampled at
    the centres of the original voxels in ``region``: :func:`fastsam3d.geometry.sample_field`
    on numpy (nearest rounds exact halves up, as ITK; border values outside the field)."""
    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode must be 'nearest' or 'linear', not {mode!r}")
    maps = axis_maps(lattice, ijk_to_ras, region)
    if maps is None:
        m = _region_to_lattice(lattice, ijk_to_ras, region)
        m[:3, 3] -= np.asarray(field_start, dtype=np.float64)
        c = _coords(m, [s.stop - s.start for s in region])
        src = field if mode == "nearest" else field.astype(_F32)
        return _interpolate(src, c, mode)
    x = field
    for ax in reversed(range(3)):  # innermost first (as the PyTorch module does on the CPU)
        c = maps[ax][1] - field_start[ax]
        n = field.shape[1 + ax]
        if mode == "nearest":
            i0 = np.clip(np.floor(np.round(c, 6) + 0.5), 0, n - 1).astype(np.int64)
            x = np.take(x, i0, axis=1 + ax)
            continue
        c = np.clip(c, 0, n - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        x0 = np.take(x, i0, axis=1 + ax).astype(_F32, copy=False)
        x1 = np.take(x, i1, axis=1 + ax).astype(_F32, copy=False)
        x = _lerp(x0, x1, _along(c - i0, 1 + ax, 4))
    pos = [0, 0, 0]
    for ax in range(3):
        pos[maps[ax][0]] = ax
    return x.transpose(0, 1 + pos[0], 1 + pos[1], 1 + pos[2])


def footprint(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    starts: Sequence[Sequence[int]],
    device: Any = None,
    size: int = CROP,
) -> np.ndarray | None:
    """Bool (nk, nj, ni): voxels of ``region`` inside at least one crop; None when all are
    (see :func:`fastsam3d.geometry.footprint`)."""
    out_shape = [s.stop - s.start for s in region]
    maps = axis_maps(lattice, ijk_to_ras, region)
    result = np.zeros(out_shape, dtype=bool)
    if maps is None:
        c = _coords(_region_to_lattice(lattice, ijk_to_ras, region), out_shape)
        for st in starts:
            ok = np.ones(out_shape, dtype=bool)
            for d in range(3):
                ok &= (c[..., d] >= st[d] - 0.5) & (c[..., d] < st[d] - 0.5 + size)
            result |= ok
        return result
    for st in starts:
        parts = []
        for ax in range(3):
            q, c = maps[ax]
            c = c - st[ax]
            parts.append(_along((c >= -0.5) & (c < size - 0.5), q, 3).astype(bool))
        if all(bool(p.all()) for p in parts):
            return None
        result |= parts[0] & parts[1] & parts[2]
    return result


def _grid(out_shape: Sequence[int], out_to_norm: np.ndarray) -> np.ndarray:
    """(*out_shape, 3) float32, the very operations of ``geometry._grid`` (same rounding)."""
    g = np.asarray(out_to_norm[:3], dtype=_F32)
    ramps = [np.arange(n, dtype=_F32)[:, None] * g[:, d] for d, n in enumerate(out_shape)]
    ramps[0] = ramps[0] + g[:, 3]
    return (ramps[0][:, None, :] + ramps[1][None, :, :])[:, :, None, :] + ramps[2][None, None]


def ras_box_mask(
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    lo: Sequence[float],
    hi: Sequence[float],
    device: Any = None,
) -> np.ndarray:
    """Bool (nk, nj, ni): voxels of ``region`` whose centre lies in the RAS box [lo, hi] (mm)."""
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in region]
    to_ras = (np.asarray(ijk_to_ras) @ kji_to_ijk @ shift)[[2, 1, 0, 3]]
    g = _grid([s.stop - s.start for s in region], to_ras)  # (.., 3) as (S, A, R)
    lo_t = np.asarray(lo, dtype=np.float64)[::-1].astype(_F32)
    hi_t = np.asarray(hi, dtype=np.float64)[::-1].astype(_F32)
    return ((g >= lo_t) & (g <= hi_t)).all(-1)


# --- the session's seam ---------------------------------------------------------------------
class NumpyOps:
    """The array operations a :class:`fastsam3d.Session` needs, on numpy arrays in host memory
    (the runner takes and returns numpy: ONNX Runtime). Same methods as
    :class:`fastsam3d.geometry.TorchOps`."""

    name = "numpy"
    device = "cpu"

    def inference(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def upload(self, array: np.ndarray) -> tuple[np.ndarray, int, float, float]:
        """(the session's own float32 copy shaped (1, 1, k, j, i), voxels not finite, min, max)."""
        a = np.array(array, dtype=_F32, order="C")  # always a copy, native byte order
        finite = np.isfinite(a)
        bad = int(a.size - np.count_nonzero(finite))
        if bad:
            return a[None, None], bad, float("nan"), float("nan")
        return a[None, None], 0, float(a.min()), float(a.max())

    def zeros_lowres(self) -> np.ndarray:
        return np.zeros((1, 1) + (LOWRES,) * 3, dtype=_F32)

    def points(self, coords: np.ndarray) -> np.ndarray:
        return np.asarray(coords, dtype=_F32)[None]

    def labels(self, labels: Sequence[int]) -> np.ndarray:
        return np.asarray([list(labels)], dtype=np.int64)

    def first_channel(self, low_res: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(low_res[:, :1], dtype=_F32)

    def all_finite(self, x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def tile_weights(self) -> np.ndarray:
        return tile_weights()

    def sample_crop(
        self, volume: np.ndarray, lattice: Lattice, ijk_to_ras: np.ndarray, start: Sequence[int]
    ) -> np.ndarray:
        return sample_crop(volume, lattice, ijk_to_ras, start)

    def network_input(self, crop: np.ndarray) -> np.ndarray:
        return znormalize(crop)[None, None]

    def upsample_logits(self, low_res: np.ndarray) -> np.ndarray:
        return upsample_logits(low_res)

    def upsample_block(self, block: np.ndarray) -> np.ndarray:
        return upsample_block(block)

    def positive_bounds(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Lowest and highest index (3,) of the positive low-res logits; None if none is."""
        pos = logits[0, 0] > 0
        if not pos.any():
            return None
        lo, hi = [], []
        for d in range(3):
            hit = np.flatnonzero(pos.any(axis=tuple(a for a in range(3) if a != d)))
            lo.append(hit[0])
            hi.append(hit[-1])
        return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)

    def argmax(self, x: np.ndarray) -> int:
        return int(np.argmax(x))

    def mask_prompt(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return mask_prompt(items)

    def blend(
        self,
        parts: Iterable[tuple[tuple[slice, ...], np.ndarray]],
        shape: Sequence[int],
        weights: np.ndarray,
    ) -> np.ndarray:
        """Weighted mean of upsampled crop logits placed at ``parts``' slices; -1 where none."""
        num = np.zeros(tuple(shape), dtype=_F32)
        den = np.zeros_like(num)
        for sl, low in parts:
            num[sl] += upsample_logits(low) * weights
            den[sl] += weights
        return np.where(den > 0, num / np.maximum(den, _F32(1e-12)), _F32(-1.0))

    def sample_field(
        self,
        field: np.ndarray,
        field_start: Sequence[int],
        lattice: Lattice,
        ijk_to_ras: np.ndarray,
        region: tuple[slice, slice, slice],
        mode: str,
    ) -> np.ndarray:
        return sample_field(field, field_start, lattice, ijk_to_ras, region, mode)

    def footprint(
        self,
        lattice: Lattice,
        ijk_to_ras: np.ndarray,
        region: tuple[slice, slice, slice],
        starts: Sequence[Sequence[int]],
    ) -> np.ndarray | None:
        return footprint(lattice, ijk_to_ras, region, starts)

    def ras_box_mask(
        self,
        ijk_to_ras: np.ndarray,
        region: tuple[slice, slice, slice],
        lo: Sequence[float],
        hi: Sequence[float],
    ) -> np.ndarray:
        return ras_box_mask(ijk_to_ras, region, lo, hi)

    def keep_box(self, mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
        """``mask`` with everything outside the slices ``box`` cleared."""
        out = np.zeros_like(mask)
        out[box] = mask[box]
        return out
