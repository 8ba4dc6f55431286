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


# ----------------------------------------------------------------------------- released rules
# FastSAM3D's released clicks (utils/click_method.py): the error region is taken from the
# previous *upsampled logits* thresholded at 0.5 (not 0, a quirk kept as released).
RELEASED_THRESHOLD = 0.5


def device_generators(
    seed: int, epoch: int, ids: list[int], device: torch.device, salt: int
) -> list[torch.Generator]:
    """One generator per sample on ``device``, seeded by (seed, epoch, sample, salt) only."""
    from .distributed import sample_generator

    out = []
    for i in ids:
        s = int(torch.randint(2**62, (1,), generator=sample_generator(seed, epoch, i, salt)))
        out.append(torch.Generator(device=device).manual_seed(s))
    return out


def random_error_click(
    gt: torch.Tensor,
    logits: torch.Tensor | None,
    generators: list[torch.Generator],
    previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released ``get_next_click3D_torch_2``, batched on the device without host syncs.

    ``gt`` (B, D, H, W) bool, ``logits`` the previous upsampled logits (B, 1, D, H, W) or None
    (nothing predicted yet: the click is a uniform voxel of the object). A uniform voxel of
    FN ∪ FP (prediction = logits > 0.5), positive if it is a false negative. Returns
    coordinates (B, 3) long in array-axis order and labels (B,) long. A sample without errors
    repeats ``previous`` (the released code would fail there). ``noise`` (B, D, H, W) float,
    optional: a buffer to draw into (overwritten), which saves a stacked copy per call.
    """
    pred = torch.zeros_like(gt) if logits is None else logits[:, 0] > RELEASED_THRESHOLD
    fn = gt & ~pred
    err = (fn | (pred & ~gt)).flatten(1)
    if noise is None:
        noise = torch.empty(gt.shape, device=gt.device)
    for row, g in zip(noise, generators):
        row.uniform_(generator=g)  # = torch.rand(row.shape, generator=g): the same stream
    idx = noise.flatten(1).masked_fill_(~err, -1.0).argmax(1)
    size = gt.shape[1:]
    coords = torch.stack([idx // (size[1] * size[2]), (idx // size[2]) % size[1], idx % size[2]], 1)
    labels = fn.flatten(1).gather(1, idx[:, None])[:, 0].long()
    if previous is not None:
        some = err.any(1)
        coords = torch.where(some[:, None], coords, previous[0])
        labels = torch.where(some, labels, previous[1])
    return coords, labels


def ritm_click(
    gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, int] | None:
    """The released ``get_next_click3D_torch_ritm`` (evaluation clicks 1 and 2): the error
    type (FN or FP) with the larger maximum distance to its border wins, and the click is a
    uniform voxel among that type's voxels deeper than half the maximum. ``pred`` is the
    previous prediction (upsampled logits > 0.5). None when there is no error."""
    fn, fp = gt & ~pred, pred & ~gt
    if not (fn.any() or fp.any()):
        return None
    dts = [ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1, 1:-1] for m in (fn, fp)]
    positive = dts[0].max() > dts[1].max()
    dt = dts[0] if positive else dts[1]
    cand = np.argwhere(dt > max(dts[0].max(), dts[1].max()) / 2.0)
    point = cand[int(rng.integers(len(cand)))]
    return point, int(fn[tuple(point)])
