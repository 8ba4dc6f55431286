"""Prompt capture in slice views, without Qt: what a press, a drag and a release mean.

The Widget forwards each slice view's left-button events here (already in VTK display
pixels) and draws what this module decides. Keeping the decisions here lets plain pytest with
slicer-core prove them: a press and release closer than the drag threshold is a point at the
press; a longer drag is a box on that slice; pixels become world RAS through the slice node's
``XYToRAS``; a box drawn on one slice gets its depth from :func:`box_depth`.

The views stay in ViewTransform mode (no markups Place mode), so Slicer's own right-drag zoom,
middle-drag pan and wheel keep working; only the left button is taken while prompting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, Tuple, Union  # noqa: UP035 - runtime aliases on Python 3.9

import numpy as np

from .errors import FastSAM3DSlicerError

#: A press and release closer than this (logical pixels) is a click, not a drag.
DRAG_THRESHOLD_PX = 5.0

#: Prompts accepted while earlier ones are still predicting; more are refused with a message.
MAX_QUEUED_PROMPTS = 3

XY = Tuple[float, float]  # noqa: UP006 - evaluated at runtime (Python 3.9)


def display_xy(qt_x: float, qt_y: float, view_height: float, pixel_ratio: float = 1.0) -> XY:
    """Qt widget position (logical px, origin top-left) -> VTK display px (origin bottom-left)."""
    return (float(qt_x) * pixel_ratio, (float(view_height) - float(qt_y)) * pixel_ratio)


def xy_to_ras(slice_node: Any, xy: Sequence[float]) -> np.ndarray:
    """World RAS of a display pixel on the slice that ``slice_node`` shows."""
    m = slice_node.GetXYToRAS()
    p = m.MultiplyPoint((float(xy[0]), float(xy[1]), 0.0, 1.0))
    return np.array(p[:3], dtype=np.float64)


def slice_axes(slice_node: Any) -> np.ndarray:
    """Unit vectors (rows) of the slice's in-plane x, in-plane y and normal, in world RAS."""
    m = slice_node.GetSliceToRAS()
    axes = np.array([[m.GetElement(r, c) for r in range(3)] for c in range(3)], np.float64)
    norms = np.linalg.norm(axes, axis=1)
    if np.any(norms == 0):
        raise ValueError("the slice view has a degenerate orientation")
    return axes / norms[:, None]


def box_depth(width_mm: float, height_mm: float) -> float:
    """Through-plane depth of a box drawn on one slice: its larger in-plane side.

    A structure outlined on a slice usually extends about as far through-plane as it does
    in-plane, and the box only bounds the result (the network's mask decides inside it): a box
    that is too shallow cuts the structure off, one that is too deep costs nothing. So the box
    becomes as deep as its larger side, centred on the slice it was drawn on.
    """
    return float(max(width_mm, height_mm))


@dataclasses.dataclass(frozen=True)
class SliceBox:
    """An oriented box in world RAS: centre, unit axes (rows: in-plane x, y, normal), size."""

    center: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]
    size: tuple[float, float, float]

    def corners(self) -> np.ndarray:
        """The eight corners in world RAS, shape (8, 3)."""
        axes = np.asarray(self.axes, np.float64)
        half = np.asarray(self.size, np.float64) / 2.0
        signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
        return np.asarray(self.center, np.float64) + (signs * half) @ axes

    def object_to_world(self) -> np.ndarray:
        """4x4 matrix whose columns are the axes and whose translation is the centre."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.axes, np.float64).T
        m[:3, 3] = self.center
        return m


def box_from_drag(slice_node: Any, xy0: Sequence[float], xy1: Sequence[float]) -> SliceBox:
    """The box a drag from ``xy0`` to ``xy1`` (display px) draws on the slice, with depth."""
    p0, p1 = xy_to_ras(slice_node, xy0), xy_to_ras(slice_node, xy1)
    axes = slice_axes(slice_node)
    diagonal = p1 - p0
    width, height = abs(float(diagonal @ axes[0])), abs(float(diagonal @ axes[1]))
    if width <= 0 or height <= 0:
        raise ValueError("The box has no area; drag across the structure.")
    size = (width, height, box_depth(width, height))
    return SliceBox(tuple((p0 + p1) / 2.0), tuple(map(tuple, axes)), size)


def set_roi_from_box(roi_node: Any, box: SliceBox) -> None:
    """Show ``box`` as an ROI (rotated like the slice) so the user sees and can adjust it."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r, row in enumerate(box.object_to_world()):
        for c, value in enumerate(row):
            m.SetElement(r, c, float(value))
    roi_node.SetAndObserveObjectToNodeMatrix(m)
    roi_node.SetSize(*box.size)


@dataclasses.dataclass(frozen=True)
class PointPrompt:
    world: tuple[float, float, float]
    positive: bool


@dataclasses.dataclass(frozen=True)
class BoxPrompt:
    box: SliceBox


Prompt = Union[PointPrompt, BoxPrompt]  # noqa: UP007 - evaluated at runtime (Python 3.9)


@dataclasses.dataclass
class _Press:
    view: Hashable
    xy: XY
    threshold: float
    dragging: bool = False


class PromptCapture:
    """The left-button gesture state shared by every slice view, and the prompt polarity.

    ``press``/``move``/``release`` return whether the Widget must swallow the event (so the
    view does not window/level under a prompt); ``release`` also returns the finished prompt.
    """

    def __init__(self, threshold_px: float = DRAG_THRESHOLD_PX) -> None:
        self.threshold_px = float(threshold_px)
        self.active = False
        self.positive = True
        self._press: _Press | None = None

    def start(self, positive: bool | None = None) -> None:
        """Begin prompting (optionally with a polarity); views keep zoom and pan."""
        if positive is not None:
            self.positive = bool(positive)
        self.active = True

    def stop(self) -> None:
        self.active = False
        self._press = None

    def toggle_polarity(self) -> bool:
        self.positive = not self.positive
        return self.positive

    @property
    def pressing(self) -> bool:
        """A left button went down on a view while prompting and is not released yet."""
        return self._press is not None

    @property
    def dragging(self) -> bool:
        return self._press is not None and self._press.dragging

    def press(self, view: Hashable, xy: Sequence[float], pixel_ratio: float = 1.0) -> bool:
        if not self.active:
            return False
        self._press = _Press(view, (float(xy[0]), float(xy[1])), self.threshold_px * pixel_ratio)
        return True

    def move(self, view: Hashable, xy: Sequence[float]) -> tuple[XY, XY] | None:
        """The rectangle to preview (press corner, current corner) once the press is a drag."""
        press = self._press
        if press is None or press.view != view:
            return None
        if not press.dragging:
            dx, dy = xy[0] - press.xy[0], xy[1] - press.xy[1]
            press.dragging = (dx * dx + dy * dy) ** 0.5 >= press.threshold
        return (press.xy, (float(xy[0]), float(xy[1]))) if press.dragging else None

    def release(self, view: Hashable, xy: Sequence[float], slice_node: Any) -> Prompt | None:
        """The finished gesture: a point at the press, or the box the drag spans."""
        press, self._press = self._press, None
        if press is None or press.view != view or not self.active:
            return None
        if not press.dragging:
            dx, dy = xy[0] - press.xy[0], xy[1] - press.xy[1]
            press.dragging = (dx * dx + dy * dy) ** 0.5 >= press.threshold
        if press.dragging:
            return BoxPrompt(box_from_drag(slice_node, press.xy, xy))
        return PointPrompt(tuple(xy_to_ras(slice_node, press.xy)), self.positive)

    def cancel(self) -> None:
        """Forget a gesture in progress (Esc, the view lost the mouse, the module closed)."""
        self._press = None


def refusal(pending: int, limit: int = MAX_QUEUED_PROMPTS) -> str | None:
    """Why a new prompt is refused while ``pending`` prompts are predicting, or None."""
    if pending >= limit:
        return (
            f"Still predicting {pending} prompts; this one was not placed. "
            "Place it again when the segment has updated."
        )
    return None


def progress_text(pending: int, elapsed_s: float) -> str:
    """The status line while predicting: elapsed seconds once it takes longer than one."""
    text = "Predicting..."
    if elapsed_s >= 1.0:
        text = f"Predicting... {int(elapsed_s)} s"
    if pending > 1:
        text += f" ({pending - 1} more queued)"
    return text


# -- target: the volume, segmentation and segment that prompts edit -------------------------


class NoVolumeError(FastSAM3DSlicerError, ValueError):
    """A prompt in a view that shows no volume, with no source volume selected."""


@dataclasses.dataclass
class Target:
    volume: Any
    segmentation: Any
    segment_id: str
    created: tuple[str, ...] = ()  # "segmentation" and/or "segment"


def new_segment(segmentation_node: Any) -> str:
    """Add an empty segment (Slicer names and colours it) and return its ID."""
    return segmentation_node.GetSegmentation().AddEmptySegment()


def ensure_target(
    scene: Any,
    volume: Any,
    segmentation: Any,
    segment_id: str | None,
    view_volume: Any = None,
) -> Target:
    """What the next prompt edits, creating a segmentation and a segment when none is chosen.

    ``volume`` is the editor's source volume; without it the volume shown in the clicked view
    (``view_volume``) is used. A new segmentation takes that volume's geometry.
    """
    volume = volume if volume is not None else view_volume
    if volume is None:
        raise NoVolumeError(
            "No volume to segment: load a volume, show it in a slice view, and click on it."
        )
    created = []
    if segmentation is None:
        segmentation = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName("Segmentation")
        )
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        created.append("segmentation")
    if not segment_id or segmentation.GetSegmentation().GetSegment(segment_id) is None:
        segment_id = new_segment(segmentation)
        created.append("segment")
    return Target(volume, segmentation, segment_id, tuple(created))


__all__ = [
    "BoxPrompt",
    "DRAG_THRESHOLD_PX",
    "MAX_QUEUED_PROMPTS",
    "NoVolumeError",
    "PointPrompt",
    "PromptCapture",
    "SliceBox",
    "Target",
    "box_depth",
    "box_from_drag",
    "display_xy",
    "ensure_target",
    "new_segment",
    "progress_text",
    "refusal",
    "set_roi_from_box",
    "slice_axes",
    "xy_to_ras",
]
