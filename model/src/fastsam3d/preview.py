"""Three-slice PNG preview: axial, coronal and sagittal slices through a point, mask outlined.

Slices are shown in the volume's nearest RAS orientation (flips/permutes of the stored axes, no
resampling) with the anatomical directions written on the edges, so a stored LPS or permuted
volume looks the same as an RAS one. Uses matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .geometry import closest_orientation
from .volume import Volume

__all__ = ["save_preview"]

_NAMES = (("L", "R"), ("P", "A"), ("I", "S"))


def _to_ras_view(volume: Volume, array: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """``array`` ([k, j, i]) as a view indexed (R, A, S), plus spacing and index maps."""
    axis_of_world, sign_of_world = closest_orientation(volume.ijk_to_ras[:3, :3])
    a = array.transpose(2, 1, 0)  # (i, j, k)
    a = a.transpose(axis_of_world)
    flips = []
    for w in range(3):
        if sign_of_world[w] < 0:
            a = np.flip(a, axis=w)
        flips.append(sign_of_world[w] < 0)
    spacing = volume.spacing[list(axis_of_world)]
    return a, spacing, [axis_of_world, flips]


def _ras_index(volume: Volume, ras: Sequence[float], maps: list) -> np.ndarray:
    """Continuous index of a RAS point in the (R, A, S)-ordered view."""
    axis_of_world, flips = maps
    ijk = volume.ras_to_ijk(ras)
    size = np.array(volume.shape[::-1], dtype=np.float64)
    out = np.empty(3)
    for w in range(3):
        ax = axis_of_world[w]
        out[w] = size[ax] - 1 - ijk[ax] if flips[w] else ijk[ax]
    return out


def save_preview(volume: Volume, mask: np.ndarray, path: str | os.PathLike,
                 points: Sequence[tuple[Sequence[float], bool]] = (),
                 box: tuple[Sequence[float], Sequence[float]] | None = None,
                 centre: Sequence[float] | None = None, title: str | None = None) -> None:
    """Write a PNG with three orthogonal slices through ``centre`` (default: the first point,
    else the box centre, else the mask's centre), the mask outlined and the clicks marked
    (green + positive, red x negative; only clicks within 2 voxels of a slice are drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img, spacing, maps = _to_ras_view(volume, volume.array)
    msk, _, _ = _to_ras_view(volume, np.asarray(mask, dtype=bool))
    if centre is None:
        if points:
            centre = points[0][0]
        elif box is not None:
            centre = (np.asarray(box[0]) + np.asarray(box[1])) / 2
    if centre is None and msk.any():
        c_idx = np.argwhere(msk).mean(axis=0)
    elif centre is None:
        c_idx = (np.array(img.shape) - 1) / 2
    else:
        c_idx = _ras_index(volume, centre, maps)
    c = np.clip(np.round(c_idx).astype(int), 0, np.array(img.shape) - 1)
    sample = img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64),
                 :: max(1, img.shape[2] // 64)]
    lo, hi = np.percentile(sample, [1, 99.5])
    if hi <= lo:
        hi = lo + 1

    fig = Figure(figsize=(12, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    for n, (name, fixed) in enumerate(views):
        ax = fig.add_subplot(1, 3, n + 1)
        h_axis, v_axis = [d for d in range(3) if d != fixed]  # horizontal, vertical
        sl = [slice(None)] * 3
        sl[fixed] = c[fixed]
        s_img = img[tuple(sl)].T  # rows = v_axis, cols = h_axis
        s_msk = msk[tuple(sl)].T
        aspect = spacing[v_axis] / spacing[h_axis]
        ax.imshow(s_img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                  interpolation="nearest")
        if s_msk.any():
            ax.contour(s_msk.astype(np.float32), levels=[0.5], colors=["#ff3b30"],
                       linewidths=1.2)
        for ras, positive in points:
            p = _ras_index(volume, ras, maps)
            if abs(p[fixed] - c[fixed]) <= 2:
                ax.plot(p[h_axis], p[v_axis], marker="+" if positive else "x", markersize=12,
                        mew=2, color="#34c759" if positive else "#ff3b30")
        if box is not None:
            b0 = _ras_index(volume, box[0], maps)
            b1 = _ras_index(volume, box[1], maps)
            x0, x1 = sorted((b0[h_axis], b1[h_axis]))
            y0, y1 = sorted((b0[v_axis], b1[v_axis]))
            ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="#ffcc00", lw=1)
        ax.set_title(f"{name} (slice {c[fixed]})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{_NAMES[h_axis][0]}  <->  {_NAMES[h_axis][1]}", fontsize=8)
        ax.set_ylabel(f"{_NAMES[v_axis][0]}  <->  {_NAMES[v_axis][1]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
