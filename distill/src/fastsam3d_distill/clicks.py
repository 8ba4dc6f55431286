"""Simulated clicks, shared by decoder fine-tuning and evaluation.

First click: inside the object (its most interior voxel, or a random voxel when training).
Later clicks: in the largest connected error region (false negatives give a positive click,
false positives a negative one), at that region's most interior voxel by a Euclidean distance
transform, the way a user clicks the middle of the biggest mistake. Coordinates are voxel
indices of the array given, in its axis order.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _interior_point(mask: np.ndarray) -> np.ndarray:
    """The voxel of ``mask`` farthest from its boundary (EDT on the bounding box only)."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    sub = np.pad(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)
    dist = ndimage.distance_transform_edt(sub)
    best = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.asarray(best) - 1 + lo


def first_click(gt: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """A positive click inside ``gt``: its most interior voxel, or uniform when a generator is
    given (training wants variety, evaluation wants reproducibility)."""
    if not gt.any():
        raise ValueError("cannot click inside an empty object")
    if generator is None:
        return _interior_point(gt)
    idx = np.argwhere(gt)
    return idx[int(torch.randint(len(idx), (1,), generator=generator))]


def next_click(
    gt: np.ndarray, pred: np.ndarray, generator: torch.Generator | None = None
) -> tuple[np.ndarray, int] | None:
    """(voxel, label) in the largest error region; None when the prediction is perfect.

    With a generator, the region is still the largest but the voxel is drawn uniformly from
    its inner half (distance >= half the maximum) to vary training clicks.
    """
    fn = gt & ~pred
    fp = pred & ~gt
    best: tuple[int, np.ndarray, int] | None = None
    for err, label in ((fn, 1), (fp, 0)):
        if not err.any():
            continue
        comps, n = ndimage.label(err)
        sizes = np.bincount(comps.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), comps == k + 1, label)
    if best is None:
        return None
    _, region, label = best
    if generator is None:
        return _interior_point(region), label
    idx = np.argwhere(region)
    lo, hi = idx.min(0), idx.max(0) + 1
    sub = np.pad(region[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)
    dist = ndimage.distance_transform_edt(sub)
    inner = np.argwhere(dist >= 0.5 * dist.max()) - 1 + lo
    return inner[int(torch.randint(len(inner), (1,), generator=generator))], label


def bbox(gt: np.ndarray) -> np.ndarray:
    """(min0, min1, min2, max0, max1, max2) voxel box of ``gt`` (inclusive)."""
    idx = np.argwhere(gt)
    return np.concatenate([idx.min(0), idx.max(0)]).astype(np.float32)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)
