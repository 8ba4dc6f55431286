"""Crop planning for the interactive session: which 128^3 lattice crops an object uses.

Pure functions of the session's state (:class:`State`, its :class:`Tile` crops and
:class:`Click` prompts) and the canonical :class:`fastsam3d.geometry.Lattice`: box tiling,
the points each crop's decoder sees, the mask prompt a new crop inherits from its neighbours and
propagation across crop faces. The policy itself is described in :mod:`fastsam3d.session`; the
network is reached only through the ``decode`` callback the session passes in, and the arrays
(torch tensors or numpy arrays) only through the session's ``ops``
(:class:`fastsam3d.geometry.TorchOps` or :class:`fastsam3d.resample_numpy.NumpyOps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import lattice as geo

__all__ = [
    "Click",
    "Tile",
    "State",
    "box_crop_starts",
    "inside_tile",
    "points_for",
    "mask_prompt_from",
    "propagate",
    "seed_at_face",
]

HALF = geo.CROP // 2
STEP = geo.CROP // 2  # neighbour crops overlap by half a crop
KNOT = geo.CROP // geo.LOWRES  # lattice voxels per low-res logit

Start = tuple[int, int, int]


@dataclass(frozen=True)
class Click:
    """A prompt point: continuous lattice index (3,), its RAS position (mm) and its sign."""

    index: np.ndarray
    ras: tuple[float, float, float]
    positive: bool


@dataclass(frozen=True)
class Tile:
    """One crop of the object: lattice start, (1, 1, 32, 32, 32) low-res logits, seeds."""

    start: tuple[int, int, int]
    logits: Any  # a torch.Tensor or a numpy array, as the session's ops hold them
    seeds: tuple[Click, ...] = ()  # points the session placed (propagation, boxes)
    iou: float | None = None


@dataclass(frozen=True)
class State:
    """One undo step: the object's crops, the user's clicks and the box (RAS min, max)."""

    tiles: dict[Start, Tile] = field(default_factory=dict)
    clicks: tuple[Click, ...] = ()
    box: tuple[np.ndarray, np.ndarray] | None = None
    at_crop_limit: bool = False


Decode = Callable[
    [Start, Sequence[Click], Any],  # noqa: UP045 (Python 3.9)
    tuple[Any, Optional[float]],
]


def box_crop_starts(
    lattice: geo.Lattice, lo: np.ndarray, hi: np.ndarray
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Crop starts per lattice axis covering the RAS box, and the box's lattice bounds.

    A box side that fits in one crop (with 4 voxels to spare each side) gets one crop centred
    on it; a longer one is tiled with crops overlapping by at least a quarter.
    """
    lat = lattice.ras_to_lattice(geo.box_corners(lo, hi))
    llo = np.maximum(lat.min(axis=0), 0)
    lhi = np.minimum(lat.max(axis=0), np.array(lattice.shape) - 1)
    starts_per_axis = []
    for a in range(3):
        length = lhi[a] - llo[a]
        if length <= geo.CROP - 8:
            starts_per_axis.append([int(math.floor((llo[a] + lhi[a]) / 2 + 0.5)) - HALF])
        else:
            n = math.ceil((length + 8 - geo.CROP) / (geo.CROP * 3 // 4)) + 1
            first, last = llo[a] - 4, lhi[a] + 4 - geo.CROP
            starts_per_axis.append(
                [int(round(first + (last - first) * t / (n - 1))) for t in range(n)]
            )
    return starts_per_axis, llo, lhi


def inside_tile(start: Sequence[int], index: np.ndarray, margin: float = 0.0) -> bool:
    """Whether lattice ``index`` lies in the crop at ``start``, ``margin`` voxels from its faces."""
    st = np.asarray(start, dtype=np.float64)
    return bool(np.all(index >= st - 0.5 + margin) and np.all(index < st + geo.CROP - 0.5 - margin))


def points_for(
    state: State, tile: Tile | None, start: Sequence[int], newest: Click, point_policy: str
) -> list[Click]:
    """The points the decoder sees for the crop at ``start`` (see the session's point policy)."""
    if point_policy == "newest":
        return [newest]
    seeds = list(tile.seeds) if tile is not None else []
    clicks = [c for c in state.clicks if inside_tile(start, c.index)]
    return seeds + clicks + [newest]


def mask_prompt_from(tiles: dict[Start, Tile], start: Sequence[int], ops: Any) -> Any:
    """Low-res mask prompt for a new crop: the existing crops' logits where they overlap
    it (averaged), 0 (= no information, as on a first click) elsewhere."""
    items = []
    for t in tiles.values():
        off = np.asarray(start, dtype=np.float64) - np.asarray(t.start, dtype=np.float64)
        if np.any(np.abs(off) >= geo.CROP):
            continue
        items.append((t.logits, off))
    return ops.mask_prompt(items)


def propagate(
    tiles: dict[Start, Tile],
    queue: Sequence[Start],
    clicks: Sequence[Click],
    *,
    lattice: geo.Lattice,
    max_crops: int,
    point_policy: str,
    decode: Decode,
    ops: Any,
) -> bool:
    """Add neighbour crops to ``tiles`` (in place) while the mask reaches crop faces with volume
    behind them; True if ``max_crops`` stopped it."""
    shape = lattice.shape
    queue = list(queue)
    while queue:
        s = queue.pop(0)
        t = tiles[s]
        pos = t.logits[0, 0] > 0
        for axis in range(3):
            for direction in (-1, 1):
                at = 0 if direction < 0 else geo.LOWRES - 1
                face = pos[(slice(None),) * axis + (at,)]
                if not bool(face.any()):
                    continue
                if direction < 0 and s[axis] <= 0:
                    continue  # nothing of the volume behind this face
                if direction > 0 and s[axis] + geo.CROP >= shape[axis]:
                    continue
                n = list(s)
                n[axis] += direction * STEP
                nstart = (n[0], n[1], n[2])
                if any(np.all(np.abs(np.subtract(o, nstart)) < STEP // 2) for o in tiles):
                    continue
                if len(tiles) >= max_crops:
                    return True
                seed = seed_at_face(t, axis, direction, lattice, ops)
                prompt = mask_prompt_from(tiles, nstart, ops)
                points = [seed]
                if point_policy == "accumulate":  # the user's clicks it contains too
                    points += [c for c in clicks if inside_tile(nstart, c.index)]
                logits, iou = decode(nstart, points, prompt)
                tiles[nstart] = Tile(nstart, logits, (seed,), iou)
                queue.append(nstart)
    return False


def seed_at_face(tile: Tile, axis: int, direction: int, lattice: geo.Lattice, ops: Any) -> Click:
    """A positive point where the mask crosses a face: the strongest logit in the last
    16 voxels before it (about the middle of the neighbouring crop along that axis)."""
    up = ops.upsample_logits(tile.logits)
    sl = [slice(None)] * 3
    sl[axis] = slice(0, 16) if direction < 0 else slice(geo.CROP - 16, geo.CROP)
    slab = up[tuple(sl)]
    flat = ops.argmax(slab)
    idx = np.array(np.unravel_index(flat, tuple(slab.shape)), dtype=np.float64)
    if direction > 0:
        idx[axis] += geo.CROP - 16
    lat = idx + np.asarray(tile.start, dtype=np.float64)
    return Click(lat, tuple(lattice.lattice_to_ras(lat).tolist()), True)
