"""Three-slice PNG preview: axial, coronal and sagittal slices through a point, the mask
filled and outlined, clicks and box marked, with a legend.

Slices are shown in the volume's nearest RAS orientation (flips/permutes of the stored axes, no
resampling) and in Slicer's default convention: patient right on the image's left in axial and
coronal views (radiological), anterior on the left in the sagittal view; the directions are
written on the edges. An oblique volume is shown on its voxel grid, and the figure says so with
the angle. Uses matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .lattice import closest_orientation
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


def _obliquity_degrees(volume: Volume) -> float:
    """Largest angle between a voxel axis and the world axis it is shown as."""
    d = volume.ijk_to_ras[:3, :3] / volume.spacing
    return float(np.degrees(np.arccos(np.clip(np.max(np.abs(d), axis=0).min(), -1, 1))))


def _window(img: np.ndarray) -> tuple[float, float, str]:
    """Display range: a soft-tissue window for CT-like (Hounsfield) data, else percentiles."""
    sample = img[
        :: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64), :: max(1, img.shape[2] // 64)
    ]
    lo, hi = (float(v) for v in np.percentile(sample, [1, 99.5]))
    if lo <= -500 and hi >= 300:  # air at about -1000 HU and dense tissue: CT
        return -160.0, 240.0, "CT soft-tissue window (-160..240 HU)"
    if hi <= lo:
        hi = lo + 1
    return lo, hi, "grey levels: 1st..99.5th percentile"


def save_preview(
    volume: Volume,
    mask: np.ndarray,
    path: str | os.PathLike,
    points: Sequence[tuple[Sequence[float], bool]] = (),
    box: tuple[Sequence[float], Sequence[float]] | None = None,
    centre: Sequence[float] | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG with three orthogonal slices through ``centre`` (default: the first point,
    else the box centre, else the mask's centre): the mask filled in translucent red with its
    outline, positive clicks as green +, negative clicks as red x (only clicks within 2 voxels
    of a slice are drawn), the box in yellow; a legend, the display convention and the file's
    own slice index (i, j or k) under each view."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    img, spacing, maps = _to_ras_view(volume, volume.array)
    msk, _, _ = _to_ras_view(volume, np.asarray(mask, dtype=bool))
    axis_of_world, flips = maps
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
    lo, hi, window = _window(img)
    oblique = _obliquity_degrees(volume)
    fill = ListedColormap([(1.0, 0.23, 0.19, 0.0), (1.0, 0.23, 0.19, 0.45)])

    fig = Figure(figsize=(12, 5.4), dpi=100)
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
        ax.imshow(
            s_img,
            cmap="gray",
            vmin=lo,
            vmax=hi,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
        if s_msk.any():
            ax.imshow(
                s_msk.astype(np.uint8),
                cmap=fill,
                vmin=0,
                vmax=1,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
            padded = np.pad(s_msk, 1).astype(np.float32)  # closes outlines at the slice edge
            ax.contour(
                np.arange(-1, s_msk.shape[1] + 1),
                np.arange(-1, s_msk.shape[0] + 1),
                padded,
                levels=[0.5],
                colors=["#ff3b30"],
                linewidths=1.2,
            )
        for ras, positive in points:
            p = _ras_index(volume, ras, maps)
            if abs(p[fixed] - c[fixed]) <= 2:
                ax.plot(
                    p[h_axis],
                    p[v_axis],
                    marker="+" if positive else "x",
                    markersize=12,
                    mew=2,
                    color="#34c759" if positive else "#ff3b30",
                )
        if box is not None:
            b0 = _ras_index(volume, box[0], maps)
            b1 = _ras_index(volume, box[1], maps)
            x0, x1 = sorted((b0[h_axis], b1[h_axis]))
            y0, y1 = sorted((b0[v_axis], b1[v_axis]))
            ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="#ffcc00", lw=1)
        ax.set_xlim(s_img.shape[1] - 0.5, -0.5)  # Slicer's convention: R (or A) on the left
        ax.set_ylim(-0.5, s_img.shape[0] - 0.5)
        file_axis = axis_of_world[fixed]
        size = img.shape[fixed]
        index = size - 1 - c[fixed] if flips[fixed] else c[fixed]
        label = name if oblique < 1 else f"~{name} (oblique)"
        ax.set_title(f"{label}: slice {'ijk'[file_axis]} = {index} of 0..{size - 1}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{_NAMES[h_axis][1]}  <->  {_NAMES[h_axis][0]}", fontsize=8)
        ax.set_ylabel(f"{_NAMES[v_axis][0]}  <->  {_NAMES[v_axis][1]}", fontsize=8)
    handles = [
        Patch(facecolor=(1.0, 0.23, 0.19, 0.45), edgecolor="#ff3b30", label="mask"),
        Line2D([], [], ls="", marker="+", ms=10, mew=2, color="#34c759", label="positive click"),
        Line2D([], [], ls="", marker="x", ms=9, mew=2, color="#ff3b30", label="negative click"),
        Line2D([], [], color="#ffcc00", lw=1.5, label="box"),
    ]
    fig.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0.005, 0.03 if oblique < 1 else 0.055),
        ncol=4,
        fontsize=9,
        frameon=False,
    )
    note = (
        "Slicer's view convention: patient right on the image left (radiological), "
        "anterior on the left in sagittal. " + window + "."
    )
    if oblique >= 1:
        note += (
            f"\nOblique volume: slices follow the voxel grid, up to {oblique:.0f} deg from "
            "true axial/coronal/sagittal (labels give the nearest direction)."
        )
    fig.text(0.01, 0.008, note, ha="left", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.09 if oblique < 1 else 0.12, 1, 1))
    fig.savefig(os.fspath(path))
