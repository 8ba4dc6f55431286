"""Where the module's settings live, without Qt.

- Masking (editable area, intensity range, modify other segments) lives in the Segment Editor
  module's own parameter node (the scene singleton tagged ``SegmentEditor``), so a choice made
  in either module applies in both. The FastSAM3D panel shows its own controls for it because
  Slicer's editor widget hides its masking section unless an editor effect is active.
- The user's other choices (weights, device, point polarity) live in the module's parameter
  node (FastSAM3DSlicerParameterNode, saved with the scene) and follow into per-user
  preferences kept in a key/value store (QSettings in Slicer, a dict in tests), from which a
  new scene's parameter node starts (:meth:`Preferences.of` / :meth:`Preferences.apply`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import slicer

#: The Segment Editor module's singleton tag (Modules/Scripted/SegmentEditor/SegmentEditor.py).
SEGMENT_EDITOR_TAG = "SegmentEditor"


def segment_editor_node(scene: Any) -> Any:
    """The scene's shared Segment Editor parameter node, created as the Segment Editor does."""
    node = scene.GetSingletonNode(SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")  # honours scene defaults
        if node is not None:
            node.UnRegister(None)  # CreateNodeByClass returns a reference we own
        else:  # the class is not registered with this scene (plain slicer-core)
            node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(SEGMENT_EDITOR_TAG)
        node = scene.AddNode(node)
    return node


# -- masking -------------------------------------------------------------------------------

# Labels as the Segment Editor shows them (qMRMLSegmentEditorWidget.cxx).
_SEG = slicer.vtkMRMLSegmentationNode
_EDITOR = slicer.vtkMRMLSegmentEditorNode
EDITABLE_AREAS = (
    ("Everywhere", _SEG.EditAllowedEverywhere),
    ("Inside all segments", _SEG.EditAllowedInsideAllSegments),
    ("Inside all visible segments", _SEG.EditAllowedInsideVisibleSegments),
    ("Outside all segments", _SEG.EditAllowedOutsideAllSegments),
    ("Outside all visible segments", _SEG.EditAllowedOutsideVisibleSegments),
)
OVERWRITE_MODES = (
    ("Overwrite all", _EDITOR.OverwriteAllSegments),
    ("Overwrite visible", _EDITOR.OverwriteVisibleSegments),
    ("Allow overlap", _EDITOR.OverwriteNone),
)


@dataclasses.dataclass(frozen=True)
class AreaChoice:
    """One entry of the editable-area list: a fixed mode, or inside one segment."""

    label: str
    mode: int
    segment_id: str = ""


def editable_area_choices(segmentation_node: Any) -> list[AreaChoice]:
    """The fixed modes, then "Inside <segment>" for each segment of the segmentation."""
    choices = [AreaChoice(label, mode) for label, mode in EDITABLE_AREAS]
    if segmentation_node is not None:
        segmentation = segmentation_node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(n)
            name = segmentation.GetSegment(segment_id).GetName()
            choices.append(
                AreaChoice(f"Inside {name}", _SEG.EditAllowedInsideSingleSegment, segment_id)
            )
    return choices


def current_area_index(choices: list[AreaChoice], editor_node: Any) -> int:
    """Index of the node's editable area in ``choices`` (-1: a segment no longer listed)."""
    mode = int(editor_node.GetMaskMode())
    segment_id = editor_node.GetMaskSegmentID() or ""
    for n, choice in enumerate(choices):
        if choice.mode == mode and (
            mode != _SEG.EditAllowedInsideSingleSegment or choice.segment_id == segment_id
        ):
            return n
    return -1


def set_editable_area(editor_node: Any, choice: AreaChoice) -> None:
    if choice.mode == _SEG.EditAllowedInsideSingleSegment:
        editor_node.SetMaskSegmentID(choice.segment_id)
    editor_node.SetMaskMode(choice.mode)


def overwrite_index(editor_node: Any) -> int:
    mode = int(editor_node.GetOverwriteMode())
    return next((n for n, (_, m) in enumerate(OVERWRITE_MODES) if m == mode), 0)


def set_overwrite_index(editor_node: Any, index: int) -> None:
    editor_node.SetOverwriteMode(OVERWRITE_MODES[index][1])


def set_intensity_mask(editor_node: Any, enabled: bool, low: float, high: float) -> None:
    """Limit edits to source-volume intensities in [low, high] (both ends included)."""
    if enabled and low > high:
        raise ValueError(f"the intensity range is empty ({low} > {high})")
    editor_node.SetSourceVolumeIntensityMaskRange(float(low), float(high))
    editor_node.SetSourceVolumeIntensityMask(bool(enabled))


# -- per-user preferences ------------------------------------------------------------------

DEVICES = ("auto", "cuda", "cpu", "mps")
_PREFIX = "FastSAM3DSlicer/"


def _as_bool(value: Any, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")  # QSettings hands booleans back as strings
    return default


@dataclasses.dataclass
class Preferences:
    """Choices that outlive a scene: which weights, which device, the next point's polarity."""

    weights: str = "fastsam3d"
    device: str = "auto"
    positive: bool = True

    @classmethod
    def load(cls, store: Any) -> Preferences:
        """Read from ``store`` (``value(key)``/``setValue``); unknown values fall back."""
        d = cls()
        weights = store.value(_PREFIX + "weights")
        device = store.value(_PREFIX + "device")
        return cls(
            weights=str(weights) if weights else d.weights,
            device=str(device) if device in DEVICES else d.device,
            positive=_as_bool(store.value(_PREFIX + "positive"), d.positive),
        )

    def save(self, store: Any) -> None:
        store.setValue(_PREFIX + "weights", self.weights)
        store.setValue(_PREFIX + "device", self.device)
        store.setValue(_PREFIX + "positive", "true" if self.positive else "false")

    @classmethod
    def of(cls, node: Any) -> Preferences:
        """The choices a parameter node holds (the module's FastSAM3DSlicerParameterNode, or
        anything with ``weights``/``device``/``positive``), checked as :meth:`load` checks."""
        d = cls()
        return cls(
            weights=str(node.weights) if node.weights else d.weights,
            device=str(node.device) if node.device in DEVICES else d.device,
            positive=_as_bool(node.positive, d.positive),
        )

    def apply(self, node: Any) -> None:
        """Write these choices into a parameter node (a new scene's)."""
        for field in dataclasses.fields(self):
            setattr(node, field.name, getattr(self, field.name))
