"""Coordinate bookkeeping between Slicer's world, a volume's own RAS and its voxel grid.

Pure numpy so the maths is testable without MRML. The session works in the volume's own RAS
(the frame its IJKToRAS matrix maps into); markups live in world RAS. The two differ by the
volume's parent transform, which may or may not be hardened.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import FastSAM3DSlicerError

Region = tuple[slice, slice, slice]


class PromptOutsideVolumeError(FastSAM3DSlicerError, ValueError):
    """A prompt that lies outside the volume: the model would see only padding there."""


def as_matrix(values: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(values, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    return m


def ras_to_ijk(ijk_to_ras: np.ndarray, ras: Sequence[float]) -> np.ndarray:
    """Continuous voxel index (i, j, k) of a point given in the volume's own RAS (the engine's
    rule, ``fastsam3d.volume.ras_to_ijk``: the refusal here must match the session's)."""
    from fastsam3d.volume import ras_to_ijk as _ras_to_ijk

    return _ras_to_ijk(ijk_to_ras, ras)


def inside_volume(ijk: Sequence[float], shape_kji: Sequence[int]) -> bool:
    """True when a continuous index lies within the voxel footprint, exactly as the session
    decides (``fastsam3d.volume.index_inside``)."""
    from fastsam3d.volume import index_inside

    return index_inside(ijk, shape_kji)


def check_inside(
    ijk_to_ras: np.ndarray, shape_kji: Sequence[int], ras: Sequence[float], what: str
) -> np.ndarray:
    """Return the index of ``ras`` or raise PromptOutsideVolumeError naming the prompt."""
    ijk = ras_to_ijk(ijk_to_ras, ras)
    if not inside_volume(ijk, shape_kji):
        r = ", ".join(f"{x:.1f}" for x in ras)
        raise PromptOutsideVolumeError(
            f"The {what} at RAS ({r}) lies outside the volume (voxel index "
            f"{tuple(round(float(x), 1) for x in ijk)}, size {tuple(shape_kji[::-1])}); "
            "place it on the volume being segmented."
        )
    return ijk


def box_corners_inside(
    ijk_to_ras: np.ndarray,
    shape_kji: Sequence[int],
    ras_min: Sequence[float],
    ras_max: Sequence[float],
) -> bool:
    """True when the axis-aligned RAS box overlaps the volume's footprint at all."""
    lo = np.minimum(ras_min, ras_max)
    hi = np.maximum(ras_min, ras_max)
    corners = np.array(
        [
            [(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]]
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ]
    )
    idx = np.array([ras_to_ijk(ijk_to_ras, c) for c in corners])
    dims = np.asarray(shape_kji[::-1], dtype=np.float64)
    return bool(np.all(idx.max(axis=0) >= -0.5) and np.all(idx.min(axis=0) <= dims - 0.5))


def region_to_extent(region: Region, shape_kji: Sequence[int]) -> tuple[int, ...]:
    """VTK extent (i0, i1, j0, j1, k0, k1), inclusive, of a [k, j, i] slice tuple."""
    bounds = []
    for s, n in zip(region, shape_kji):
        start, stop, step = s.indices(int(n))
        if step != 1:
            raise ValueError(f"result regions must be contiguous, got step {step}")
        bounds.append((start, stop - 1))
    (k0, k1), (j0, j1), (i0, i1) = bounds
    return (i0, i1, j0, j1, k0, k1)


def extent_is_empty(extent: Sequence[int]) -> bool:
    return extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]
