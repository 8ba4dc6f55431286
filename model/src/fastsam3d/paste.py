"""Paste-back for the interactive session: crop logits -> a mask on the original voxel grid.

The session's crops (:class:`fastsam3d.tiling.Tile`) hold low-res logits on the 1.5 mm lattice;
this module blends overlapping crops with the tile weights, samples the blended field at the
original voxels (``sample_field``), keeps only voxels inside the crops' footprints and, for a box,
inside the box. The arrays are reached through the session's ``ops``
(:class:`fastsam3d.geometry.TorchOps` or :class:`fastsam3d.resample_numpy.NumpyOps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import lattice as geo
from .result import Region, Result
from .tiling import KNOT, State, Tile

__all__ = ["changed_region", "ops_for", "paste", "region_union", "render", "upsampled_part"]


def ops_for(array: Any) -> Any:
    """The array operations for ``array``'s kind: numpy, else torch on its device."""
    if isinstance(array, np.ndarray):
        from .resample_numpy import NumpyOps

        return NumpyOps()
    from .geometry import TorchOps

    return TorchOps(array.device)


def region_union(a: Region | None, b: Region | None) -> Region | None:
    """The smallest region holding both (an empty or missing one is ignored)."""
    if a is None or any(s.stop <= s.start for s in a):
        return b
    if b is None or any(s.stop <= s.start for s in b):
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore[return-value]


def changed_region(
    state: State, lattice: geo.Lattice, ijk_to_ras: np.ndarray, shape: Sequence[int], ops: Any
) -> Region | None:
    """The voxel region (array order) that can hold the object's positive voxels, or None."""
    los, his = [], []
    for t in state.tiles.values():
        bounds = ops.positive_bounds(t.logits)
        if bounds is None:
            continue
        k0, k1 = bounds
        st = np.asarray(t.start, dtype=np.float64)
        los.append(st + np.maximum(k0 * KNOT - 4, -0.5))
        his.append(st + np.minimum(k1 * KNOT + 8, geo.CROP - 0.5))
    if not los:
        return None
    lo, hi = np.min(los, axis=0), np.max(his, axis=0)
    if state.box is not None:
        b = lattice.ras_to_lattice(geo.box_corners(*state.box))
        lo, hi = np.maximum(lo, b.min(0) - 1), np.minimum(hi, b.max(0) + 1)
    if not np.all(hi > lo):
        return None
    return geo.lattice_box_to_region(lattice, ijk_to_ras, lo, hi, shape)


def paste(
    state: State,
    region: Region,
    lattice: geo.Lattice,
    ijk_to_ras: np.ndarray,
    weights: Any,
    interpolation: str,
    ops: Any,
) -> Any:
    """The object's mask over ``region`` (bool array of ``ops``' kind shaped like the region).

    Args:
        state: the object's crops (at least one) and its box, if any.
        region: voxel slices (k, j, i) of the volume array to fill.
        lattice: the canonical lattice the crops live on.
        ijk_to_ras: the volume's 4x4 voxel-to-RAS (mm) matrix.
        weights: (128, 128, 128) blending weights from ``ops.tile_weights()``.
        interpolation: ``"nearest"`` (the reference recipe's resample) or ``"linear"``.
        ops: the session's array operations (where and on what the blending runs).
    """
    with ops.inference():
        return _paste(state, region, lattice, ijk_to_ras, weights, interpolation, ops)


def _paste(
    state: State,
    region: Region,
    lattice: geo.Lattice,
    ijk_to_ras: np.ndarray,
    weights: Any,
    interpolation: str,
    ops: Any,
) -> Any:
    tiles = list(state.tiles.values())
    if len(tiles) == 1:
        start, field = upsampled_part(tiles[0], ops)
    else:
        lo = np.min([t.start for t in tiles], axis=0)
        hi = np.max([t.start for t in tiles], axis=0) + geo.CROP
        parts = (
            (tuple(slice(int(a), int(a) + geo.CROP) for a in np.asarray(t.start) - lo), t.logits)
            for t in tiles
        )
        field = ops.blend(parts, tuple((hi - lo).tolist()), weights)
        start = tuple(int(x) for x in lo)
    if interpolation == "nearest":  # thresholding commutes with nearest sampling: gather bools
        mask = ops.sample_field((field > 0)[None], start, lattice, ijk_to_ras, region, "nearest")[0]
    else:
        mask = ops.sample_field(field[None], start, lattice, ijk_to_ras, region, "linear")[0] > 0
    box = (
        geo.footprint_box(lattice, ijk_to_ras, region, tiles[0].start) if len(tiles) == 1 else None
    )
    if box is not None:  # one crop: its footprint is a box; clear around it by slicing
        if any(b.start > 0 or b.stop < n for b, n in zip(box, mask.shape)):
            mask = ops.keep_box(mask, box)
    else:
        inside = ops.footprint(lattice, ijk_to_ras, region, [t.start for t in tiles])
        if inside is not None:
            mask = mask & inside
    if state.box is not None:
        mask &= ops.ras_box_mask(ijk_to_ras, region, state.box[0], state.box[1])
    return mask


def upsampled_part(tile: Tile, ops: Any = None) -> tuple[tuple[int, int, int], Any]:
    """The 128^3 trilinear upsample, computed only over the positive knots + 2 on each side.

    Inside that block the values equal the full upsample's; in its outer 2 voxels the block
    clamps to its edge knots where the full upsample would blend two knots outside the
    positive box: both are negative there, so the sign (all that is used) is the same, and
    beyond the block the border values are negative too (or the crop's own edge).
    """
    if ops is None:
        ops = ops_for(tile.logits)
    bounds = ops.positive_bounds(tile.logits)
    if bounds is None:
        return tile.start, ops.upsample_logits(tile.logits)
    lo = np.maximum(bounds[0] - 2, 0)
    hi = np.minimum(bounds[1] + 2, geo.LOWRES - 1) + 1
    up = ops.upsample_block(tile.logits[0, 0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    start = tuple(int(s + KNOT * a) for s, a in zip(tile.start, lo))
    return start, up  # type: ignore[return-value]


def render(
    state: State,
    lattice: geo.Lattice,
    volume: Any,
    last_region: Region | None,
    weights: Any,
    interpolation: str,
    ops: Any,
) -> Result:
    """The session's :class:`Result` for ``state``: its mask over the region the object can
    occupy joined with ``last_region`` (what the previous result covered, so pasting clears
    voxels a correction removed), as numpy."""
    region = changed_region(state, lattice, volume.ijk_to_ras, volume.shape, ops)
    out_region = region_union(region, last_region)
    if out_region is None:
        out_region = (slice(0, 0),) * 3
    shape = tuple(s.stop - s.start for s in out_region)
    if region is None:
        mask = np.zeros(shape, dtype=bool)
    else:
        mask = ops.to_numpy(
            paste(state, out_region, lattice, volume.ijk_to_ras, weights, interpolation, ops)
        )
    ious = [t.iou for t in state.tiles.values() if t.iou is not None]
    return Result(
        out_region,
        mask,
        volume.shape,
        len(state.tiles),
        float(np.mean(ious)) if ious else None,
        state.at_crop_limit,
    )
