"""The panel's Masking section: the Segment Editor module's own parameter node, shown always.

Masking (editable area, intensity range, overwrite mode) is the Segment Editor's, shared with it
(Lib ``params``); Slicer's editor widget shows its masking section only while one of its effects
is active, so this section mirrors the same node. Qt and VTK observers only; the rules are in
``FastSAM3DSlicerLib.params``.
"""

from __future__ import annotations

from typing import Any, Callable

import slicer
import vtk
from slicer.util import VTKObservationMixin

from FastSAM3DSlicerLib import params


class MaskingSection(VTKObservationMixin):
    """Keeps the masking controls and the shared Segment Editor node in step, both ways.

    ``onEffectActive()`` is called when a Segment Editor effect becomes active (it takes the
    views' left clicks from then on).
    """

    def __init__(self, ui: Any, onEffectActive: Callable[[], None]) -> None:
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.onEffectActive = onEffectActive
        self.editorNode = None  # the Segment Editor module's singleton parameter node
        self.segmentation = None  # observed for the "Inside <segment>" choices
        self.areaChoices = []

    def connect(self) -> None:
        """Fill the fixed choices and connect the controls (once, from the Widget's setup)."""
        editor = self.ui.segmentEditorWidget
        # Masking has its own, always visible section (the editor's appears only while one of
        # its effects is active); both edit the same Segment Editor parameter node.
        if hasattr(editor, "setMaskingSectionVisible"):
            editor.setMaskingSectionVisible(False)
        for label, _mode in params.OVERWRITE_MODES:
            self.ui.overwriteModeComboBox.addItem(label)
        self.ui.editableAreaComboBox.connect("activated(int)", self.onEditableAreaChosen)
        self.ui.overwriteModeComboBox.connect("activated(int)", self.onOverwriteChosen)
        self.ui.intensityMaskCheckBox.toggled.connect(self.onIntensityMaskChanged)
        self.ui.intensityRangeWidget.connect(
            "valuesChanged(double,double)", self.onIntensityMaskChanged
        )

    def select(self) -> None:
        """Use the scene's Segment Editor parameter node: masking is shared with that module."""
        node = params.segment_editor_node(slicer.mrmlScene)
        if node is not self.editorNode:
            if self.editorNode is not None:
                self.removeObserver(
                    self.editorNode, vtk.vtkCommand.ModifiedEvent, self.onEditorNodeModified
                )
            self.editorNode = node
            self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(node)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onEditorNodeModified)
        self.onEditorNodeModified()

    def release(self) -> None:
        """The scene closes: observe none of its nodes."""
        self._observeSegmentation(None)
        if self.editorNode is not None:
            self.removeObserver(
                self.editorNode, vtk.vtkCommand.ModifiedEvent, self.onEditorNodeModified
            )
            self.editorNode = None

    def onEditorNodeModified(self, caller: Any = None, event: Any = None) -> None:
        node = self.editorNode
        if node is None:
            return
        if node.GetActiveEffectName():
            self.onEffectActive()
        self._observeSegmentation(node.GetSegmentationNode())
        self.update()

    def _observeSegmentation(self, segmentation: Any) -> None:
        """Keep the "Inside <segment>" choices in step with the segments (added, renamed)."""
        if segmentation is self.segmentation:
            return
        events = (
            slicer.vtkSegmentation.SegmentAdded,
            slicer.vtkSegmentation.SegmentRemoved,
            slicer.vtkSegmentation.SegmentModified,
        )
        if self.segmentation is not None:
            for e in events:
                self.removeObserver(self.segmentation, e, self._onSegmentsChanged)
        self.segmentation = segmentation
        if segmentation is not None:
            for e in events:
                self.addObserver(segmentation, e, self._onSegmentsChanged)

    def _onSegmentsChanged(self, caller: Any = None, event: Any = None) -> None:
        self.update()

    def update(self) -> None:
        """Show the node's masking in the controls (their signals blocked meanwhile)."""
        node = self.editorNode
        if node is None:
            return
        self.areaChoices = params.editable_area_choices(node.GetSegmentationNode())
        area = self.ui.editableAreaComboBox
        area.blockSignals(True)
        area.clear()
        for choice in self.areaChoices:
            area.addItem(choice.label)
        area.setCurrentIndex(params.current_area_index(self.areaChoices, node))
        area.blockSignals(False)
        overwrite = self.ui.overwriteModeComboBox
        overwrite.blockSignals(True)
        overwrite.setCurrentIndex(params.overwrite_index(node))
        overwrite.blockSignals(False)
        enabled = bool(node.GetSourceVolumeIntensityMask())
        rangeWidget = self.ui.intensityRangeWidget
        for w in (self.ui.intensityMaskCheckBox, rangeWidget):
            w.blockSignals(True)
        self.ui.intensityMaskCheckBox.setChecked(enabled)
        volume = node.GetSourceVolumeNode()
        if volume is not None and volume.GetImageData() is not None:
            low, high = volume.GetImageData().GetScalarRange()
            rangeWidget.setRange(low, high)
        low, high = node.GetSourceVolumeIntensityMaskRange()
        if low < high:
            rangeWidget.setValues(low, high)
        rangeWidget.enabled = enabled
        for w in (self.ui.intensityMaskCheckBox, rangeWidget):
            w.blockSignals(False)

    def onEditableAreaChosen(self, index: int) -> None:
        if self.editorNode is not None and 0 <= index < len(self.areaChoices):
            params.set_editable_area(self.editorNode, self.areaChoices[index])

    def onOverwriteChosen(self, index: int) -> None:
        if self.editorNode is not None and index >= 0:
            params.set_overwrite_index(self.editorNode, index)

    def onIntensityMaskChanged(self, *args: Any) -> None:
        if self.editorNode is None:
            return
        w = self.ui.intensityRangeWidget
        try:
            params.set_intensity_mask(
                self.editorNode,
                self.ui.intensityMaskCheckBox.checked,
                w.minimumValue,
                w.maximumValue,
            )
        except ValueError as e:
            self.ui.statusLabel.text = str(e)
            slicer.util.showStatusMessage(str(e), 5000)
