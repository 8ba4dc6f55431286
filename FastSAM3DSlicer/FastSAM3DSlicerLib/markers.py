"""The prompts' markers in the scene: one point list (green positive, red negative) and one ROI
for the last box, neither saved with the scene.

A marker is addressed by its tag: the control point's ID for a point, ``"box"`` for the ROI
(the tag the Lib's prompt history keeps, so undo takes the right marker away). MRML only (no
Qt, no ``slicer.util``): the Widget calls it, tests run it on slicer-core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import vtk

from .interaction import BoxPrompt, set_roi_from_box

__all__ = [
    "BOX_ATTRIBUTE",
    "BOX_TAG",
    "NEGATIVE_COLOR",
    "OUTLINE_COLOR",
    "POSITIVE_COLOR",
    "PROMPTS_ATTRIBUTE",
    "PromptMarkers",
]

PROMPTS_ATTRIBUTE = "FastSAM3DSlicer.Prompts"
BOX_ATTRIBUTE = "FastSAM3DSlicer.Box"
BOX_TAG = "box"
POSITIVE_COLOR = (0.15, 0.85, 0.25)
NEGATIVE_COLOR = (0.95, 0.2, 0.2)
OUTLINE_COLOR = (1.0, 0.85, 0.1)


def _alive(node: Any) -> bool:
    return node is not None and node.GetScene() is not None


class PromptMarkers:
    """The point list and box ROI of one scene, created at the first prompt that needs them."""

    def __init__(self, scene: Any) -> None:
        self.scene = scene
        self.point_node = None
        self.box_node = None

    def forget(self) -> None:
        """The scene closes: its nodes go with it (never reused in the next scene)."""
        self.point_node = None
        self.box_node = None

    def ensure_point_node(self) -> Any:
        node = self.point_node
        if not _alive(node):
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "FastSAM3D prompts")
            node.SetAttribute(PROMPTS_ATTRIBUTE, "1")
            node.SetControlPointLabelFormat("")
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*POSITIVE_COLOR)  # selected flag = positive point
            display.SetColor(*NEGATIVE_COLOR)
            display.SetPointLabelsVisibility(False)
            node.SetSaveWithScene(False)
            self.point_node = node
        return node

    def ensure_box_node(self) -> Any:
        node = self.box_node
        if not _alive(node):
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "FastSAM3D box")
            node.SetAttribute(BOX_ATTRIBUTE, "1")
            node.CreateDefaultDisplayNodes()
            node.SetSaveWithScene(False)
            self.box_node = node
        return node

    def box(self) -> Any | None:
        """The box ROI while it holds a box, else None."""
        node = self.box_node
        return node if _alive(node) and node.GetNumberOfDefinedControlPoints() else None

    def _add_point(self, world: Iterable[float], positive: bool) -> str:
        node = self.ensure_point_node()
        n = node.AddControlPointWorld(vtk.vtkVector3d(*world))
        node.SetNthControlPointSelected(n, positive)  # selected = positive = green
        node.SetNthControlPointLocked(n, True)
        return node.GetNthControlPointID(n)

    def add(self, prompt: Any) -> str:
        """Show a prompt (interaction.PointPrompt or BoxPrompt); returns its tag."""
        if isinstance(prompt, BoxPrompt):
            set_roi_from_box(self.ensure_box_node(), prompt.box)
            return BOX_TAG
        return self._add_point(prompt.world, prompt.positive)

    def remove(self, tag: Any) -> None:
        """Take a prompt's marker away (undone, refused or failed); the box tag hides the ROI."""
        if tag == BOX_TAG:
            self.clear_box()
            return
        node = self.point_node
        if tag is None or not _alive(node):
            return
        index = node.GetNthControlPointIndexByID(tag)
        if index >= 0:
            node.RemoveNthControlPoint(index)

    def clear_box(self) -> None:
        if _alive(self.box_node):
            self.box_node.RemoveAllControlPoints()

    def clear_points(self) -> None:
        if _alive(self.point_node):
            self.point_node.RemoveAllControlPoints()

    def show_points(self, prompts: Callable[[], Iterable[Any]] | None) -> None:
        """Show exactly the points ``prompts()`` gives (another segment's session was
        selected; None: no network, no points); each prompt's tag becomes its new marker's ID.
        Nothing happens before the first prompt made the point list."""
        if not _alive(self.point_node):
            return
        self.point_node.RemoveAllControlPoints()
        for prompt in prompts() if prompts is not None else ():
            if prompt.kind == "point":
                prompt.tag = self._add_point(prompt.world, prompt.positive)

    def point_count(self) -> int:
        return self.point_node.GetNumberOfControlPoints() if _alive(self.point_node) else 0
