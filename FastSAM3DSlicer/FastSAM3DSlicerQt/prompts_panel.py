"""The panel's Prompts section: capture in the slice views, polarity, targets, markers,
submission to the Lib, results, undo and the segment keys.

A mixin of ``FastSAM3DSlicerWidget`` (one panel, its slots in three files): the same object, so
every slot and attribute keeps its name on the Widget. Qt wiring only: what a mouse event means
is ``FastSAM3DSlicerQt.slice_views`` and ``FastSAM3DSlicerLib.interaction``; markers are
``FastSAM3DSlicerLib.markers``; prompts run through ``FastSAM3DSlicerLib.logic``. Nothing heavy
at import: the Lib is imported inside the methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import slicer

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer without the i18n helpers

    def _(text: str) -> str:
        return text


def _prompt_failed() -> str:
    """The message over an unexpected error of one prompt (translated when shown)."""
    return _("FastSAM3D could not use this prompt.")


class PromptsPanel:
    """The Prompts section's slots; the Widget's ``__init__``/``setup`` create the state they
    use (``capture``, ``views``, ``markers``, ``deferred``, ``logic``...)."""

    # -- prompts: capture in the slice views (FastSAM3DSlicerQt.slice_views) --------------

    def onLayoutChanged(self, layout: Any = None) -> None:
        if self.parent.isEntered:
            self._installViewFilters()

    def _installViewFilters(self) -> None:
        self.views.install()
        self._applyCursors()

    def _removeViewFilters(self) -> None:
        self.views.remove()

    def _applyCursors(self) -> None:
        active = self.capture is not None and self.capture.active
        self.views.setCursor(self.capture.positive if active else None)

    def onViewEvent(self, sliceWidget: Any, obj: Any, event: Any) -> bool:
        """A slice view's mouse event; True swallows it (only the left button, only prompting)."""
        return self.views.handleEvent(self.capture, sliceWidget, obj, event)

    def _setPrompting(self, active: bool, positive: Any = None, message: str = "") -> None:
        """Start or stop taking the views' left clicks as prompts."""
        if active:
            # An editor effect or a markups placement would get the same clicks.
            self.ui.segmentEditorWidget.setActiveEffect(None)
            interactionNode = slicer.app.applicationLogic().GetInteractionNode()
            interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)
            self.capture.start(positive)
            self._saveChoices()
        else:
            self.capture.stop()
            self.views.hideOutline()
        self._showPolarity()
        self._applyCursors()
        if message:
            self._status(message)

    def _showPolarity(self) -> None:
        active, positive = self.capture.active, self.capture.positive
        for button, state in (
            (self.ui.positivePointButton, active and positive),
            (self.ui.negativePointButton, active and not positive),
        ):
            button.blockSignals(True)
            button.setChecked(state)
            button.blockSignals(False)
        sign = _("positive (green)") if positive else _("negative (red)")
        self.ui.polarityLabel.text = (
            _("Prompting: click = {sign} point, drag = box").format(sign=sign)
            if active
            else _("Not prompting (A or X to start); next point: {sign}").format(sign=sign)
        )

    def _onPolarityButton(self, on: bool, positive: bool) -> None:
        if on:
            self._setPrompting(True, positive)
        elif self.capture.active and self.capture.positive == positive:
            self._setPrompting(False)

    def onPositive(self) -> None:
        self._setPrompting(True, True)

    def onNegative(self) -> None:
        self._setPrompting(True, False)

    def onStopPrompting(self) -> None:
        self._setPrompting(False)

    def togglePolarity(self) -> None:
        self.capture.toggle_polarity()
        self._saveChoices()
        self._showPolarity()
        self._applyCursors()

    def onInteractionModeChanged(self, caller: Any = None, event: Any = None) -> None:
        """Another tool (markups placement) took the views: let it have the clicks."""
        if caller.GetCurrentInteractionMode() != caller.ViewTransform and self.capture.active:
            self._setPrompting(
                False,
                message=_(
                    "Prompting paused while another tool places markups; press A or X to prompt "
                    "again."
                ),
            )

    # -- prompts: target, markers, submission -------------------------------------------

    def _ensureTarget(self, segmentID: Any, viewVolumeID: Any) -> Any:
        """The target of the next prompt, creating a segmentation/segment if none is chosen."""
        from FastSAM3DSlicerLib import interaction

        editor = self.ui.segmentEditorWidget
        volume = editor.sourceVolumeNode()
        viewVolume = slicer.mrmlScene.GetNodeByID(viewVolumeID) if viewVolumeID else None
        target = interaction.ensure_target(
            slicer.mrmlScene, volume, editor.segmentationNode(), segmentID, viewVolume
        )
        if "segmentation" in target.created:
            editor.setSegmentationNode(target.segmentation)
        if volume is None:
            editor.setSourceVolumeNode(target.volume)
        if editor.currentSegmentID() != target.segment_id:
            editor.setCurrentSegmentID(target.segment_id)
        if target.created:
            self._status(
                _("Created a new {what} for the prompts.").format(
                    what=_(" and ").join(target.created)
                )
            )
        return target

    def _onPrompt(self, prompt: Any, viewVolumeID: Any) -> None:
        """A finished click or drag (called from the event loop, not from the view event)."""
        from FastSAM3DSlicerLib import interaction

        with slicer.util.tryWithErrorDisplay(_prompt_failed(), waitCursor=False):
            reason = interaction.refusal(self._pendingCount() + len(self.deferred))
            if reason:
                self._status(reason)
                return
            try:
                target = self._ensureTarget(
                    self.ui.segmentEditorWidget.currentSegmentID(), viewVolumeID
                )
            except interaction.NoVolumeError as e:
                self._status(str(e))
                return
            tag = self.markers.add(prompt)
            if self.logic is not None:
                self._submitPrompt(prompt, tag)
                return
            # No model yet: keep the prompt (its marker, its target) and start loading; it
            # runs once the model is ready, on the segment it was given for.
            self.deferred.append((prompt, tag, target))
            if self.modelSetup.future is None:
                self.onLoadModel()
            if self.modelSetup.state == "idle":
                self._dropDeferred(_("The model is not loaded; the prompt was removed."))
            else:
                self._status(_("Loading the model; your prompt runs as soon as it is ready."))

    def _dropDeferred(self, message: str) -> None:
        for _prompt, tag, _target in self.deferred:
            self.markers.remove(tag)
        self.deferred = []
        if message:
            self._status(message)

    def _runDeferred(self) -> None:
        """The prompts given while the model loaded, in order (from the timer's tick). One that
        fails unexpectedly reaches the error display and loses its marker; the others still
        run (Slicer's tryWithErrorDisplay raises again after showing, so it is caught here)."""
        deferred, self.deferred = self.deferred, []
        for prompt, tag, target in deferred:
            try:
                with slicer.util.tryWithErrorDisplay(_prompt_failed(), waitCursor=False):
                    self._submitPrompt(prompt, tag, target)
            except Exception:  # noqa: BLE001 - shown above; the next prompts still run
                logging.exception("FastSAM3D: a prompt given while the model loaded failed")

    def _submitPrompt(self, prompt: Any, tag: Any, target: Any = None) -> None:
        from FastSAM3DSlicerLib import interaction

        if isinstance(prompt, interaction.BoxPrompt):
            corners = prompt.box.corners()
            self._submit(lambda: self.logic.add_box(corners, tag=tag), tag, target)
        else:
            self._submit(
                lambda: self.logic.add_point(prompt.world, prompt.positive, tag=tag), tag, target
            )

    def onApplyBox(self) -> None:
        """Segment again with the box as it is now (after moving its handles)."""
        from FastSAM3DSlicerLib import mrml

        node = self.markers.box()
        if node is None:
            self._status(_("Draw a box first: drag on a slice while prompting."))
            return
        if self.logic is None:
            self._status(_("Load the model first (or draw the box again)."))
            return
        if self._refuseWhileBusy():
            return
        corners = mrml.roi_corners_world(node)
        # A refusal keeps the ROI the user adjusted (tag None); undo still hides it ("box").
        self._submit(lambda: self.logic.add_box(corners, tag="box"), None)

    def _setLogicTarget(self, target: Any = None) -> None:
        """Point the Lib at ``target`` (an interaction.Target) or the editor's selection."""
        editor = self.ui.segmentEditorWidget
        if target is None:
            target = editor.sourceVolumeNode(), editor.segmentationNode(), editor.currentSegmentID()
        else:
            target = target.volume, target.segmentation, target.segment_id
        self.logic.set_target(*target, self.editorNode)

    def _submit(self, call: Callable[[], Any], tag: Any, target: Any = None) -> None:
        """Queue a prompt on the Lib; its refusals (outside the volume, no target...: every
        FastSAM3DSlicerError) become a status line. Anything else is a bug: the marker goes and
        the error reaches the caller's tryWithErrorDisplay."""
        from FastSAM3DSlicerLib.errors import FastSAM3DSlicerError

        self._setLogicTarget(target)
        try:
            call()
        except FastSAM3DSlicerError as e:
            self.markers.remove(tag)
            self._status(str(e))
            return
        except Exception:
            self.markers.remove(tag)
            raise
        self._status(_("Predicting..."))
        self.pollTimer.start()
        self._updateButtons()
        self.onPoll()  # a fast result is written before this returns

    # -- results and edits ----------------------------------------------------------------

    def _showResults(self, results: list) -> None:
        from FastSAM3DSlicerLib import interaction
        from FastSAM3DSlicerLib.logic import FailedEdit, StaleResultError
        from FastSAM3DSlicerLib.waiting import LONG_PREDICTION_S

        failed = False
        for item in results:
            if isinstance(item, FailedEdit) and isinstance(item.error, StaleResultError):
                continue  # a result of a closed scene: dropped, its marker went with the scene
            if isinstance(item, FailedEdit):
                failed = True
                self.markers.remove(item.prompt.tag)
                self._status(_("Segmentation failed: ") + str(item.error))
                logging.error("FastSAM3D prediction failed: %s", item.error)
                continue
            text = _("Last prompt: {total:.0f} ms (network {net:.0f} ms), {voxels} voxels").format(
                total=1000 * item.total_s, net=1000 * item.inference_s, voxels=item.voxels
            )
            kept = item.outside_edits
            if kept:
                text += _("; kept {n} voxels edited outside FastSAM3D").format(n=kept)
            self.ui.latencyLabel.text = text
        notices = self.logic.notices()
        for notice in notices:
            self._status(notice)
        if self.logic.busy:
            seconds = self.logic.busy_seconds()
            text = interaction.progress_text(self._pendingCount(), seconds)
            self.ui.statusLabel.text = text
            if seconds >= LONG_PREDICTION_S:  # also where the user is looking: the status bar
                slicer.util.showStatusMessage(text, 1000)
        elif not failed and not notices:
            self.ui.statusLabel.text = ""

    def _pendingCount(self) -> int:
        return self.logic.pending_count() if self.logic is not None else 0

    def _refuseWhileBusy(self) -> bool:
        if self.logic is not None and self.logic.busy:
            self._status(
                _("Wait for the running prediction ({s} s) to finish.").format(
                    s=int(self.logic.busy_seconds())
                )
            )
            return True
        return False

    def _readyForEdits(self) -> bool:
        if self.logic is None:
            self._status(_("No prompts yet for this segment."))
            return False
        if self._refuseWhileBusy():
            return False
        self._setLogicTarget()
        return True

    def onUndo(self) -> None:
        if not self._readyForEdits():
            return
        with slicer.util.WaitCursor():
            prompt = self.logic.undo()
        if prompt is None:
            self._status(_("Nothing to undo for this segment."))
        else:
            self.markers.remove(prompt.tag)
        self._updateButtons()

    def onResetSegment(self) -> None:
        """Undo every prompt of this segment: it holds again what it held before them."""
        if not self._readyForEdits():
            return
        steps = 0
        with slicer.util.WaitCursor():
            while True:
                prompt = self.logic.undo()
                if prompt is None:
                    break
                steps += 1
                self.markers.remove(prompt.tag)
        self.markers.clear_box()
        self._status(_("Segment reset: {n} prompts undone.").format(n=steps))
        self._updateButtons()

    def onClear(self) -> None:
        """Forget this segment's prompts; the segment keeps what it holds now."""
        if not self._readyForEdits():
            return
        for prompt in self.logic.clear():
            self.markers.remove(prompt.tag)
        self.markers.clear_box()
        self._updateButtons()

    def onNewSegment(self) -> None:
        from FastSAM3DSlicerLib import interaction
        from FastSAM3DSlicerQt.slice_views import firstViewVolumeID

        try:
            self._ensureTarget("", firstViewVolumeID())
        except interaction.NoVolumeError as e:
            self._status(str(e))

    def onDeleteSegment(self) -> None:
        editor = self.ui.segmentEditorWidget
        segmentation, segmentID = editor.segmentationNode(), editor.currentSegmentID()
        segment = (
            segmentation.GetSegmentation().GetSegment(segmentID)
            if (segmentation is not None and segmentID)
            else None
        )
        if segment is None:
            self._status(_("No segment is selected."))
            return
        if self._refuseWhileBusy():
            return
        name = segment.GetName()
        if not slicer.app.testingEnabled() and not slicer.util.confirmYesNoDisplay(
            _("Delete the segment '{name}' and everything it holds?").format(name=name),
            windowTitle=_("Delete segment"),
        ):
            return
        segmentation.GetSegmentation().RemoveSegment(segmentID)
        self._status(_("Deleted the segment '{name}'.").format(name=name))

    def onToggleSegmentVisibility(self) -> None:
        """Hide or show the segment being prompted (to see the image under it)."""
        editor = self.ui.segmentEditorWidget
        segmentation, segmentID = editor.segmentationNode(), editor.currentSegmentID()
        display = segmentation.GetDisplayNode() if segmentation is not None else None
        if display is None or not segmentID:
            self._status(_("No segment is selected."))
            return
        display.SetSegmentVisibility(segmentID, not display.GetSegmentVisibility(segmentID))

    def onSegmentChanged(self, segmentID: Any = None) -> None:
        """Each segment has its own session: show only its prompts."""
        self.markers.show_points(None if self.logic is None else self._targetPrompts)

    def _targetPrompts(self) -> list:
        self._setLogicTarget()
        return self.logic.prompts()
