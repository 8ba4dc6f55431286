"""FastSAM3D interactive 3D segmentation for 3D Slicer: the module, a thin Widget and the self-test.

Everything that does not need Qt lives in FastSAM3DSlicerLib (tested with slicer-core in plain
pytest). Nothing heavy happens at import time: the Lib, numpy, torch and fastsam3d are imported
inside methods, at first use.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer without the i18n helpers

    def _(text: str) -> str:
        return text


PENDING_INSTALL_KEY = "FastSAM3DSlicer/pendingInstall"
PROMPTS_ATTRIBUTE = "FastSAM3DSlicer.Prompts"
BOX_ATTRIBUTE = "FastSAM3DSlicer.Box"
EDITOR_SINGLETON_TAG = "FastSAM3DSlicer"
POSITIVE_COLOR = (0.15, 0.85, 0.25)
NEGATIVE_COLOR = (0.95, 0.2, 0.2)


class FastSAM3DSlicer(ScriptedLoadableModule):
    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FastSAM3D")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["FastSAM3DSlicer contributors"]
        self.parent.helpText = _(
            "Interactive 3D segmentation with point and box prompts, using the distilled "
            "FastSAM3D network (or SAM-Med3D-turbo). Click positive/negative points or draw a "
            "box on any view; the selected segment is updated inside the model's 128^3 crop. "
            "Research use only, not for clinical decisions."
        )
        self.parent.acknowledgementText = _(
            "FastSAM3D (Shen et al., MICCAI 2024) and SAM-Med3D (Wang et al.) networks; weights "
            "are downloaded from their authors' releases and keep their own terms."
        )
        # An install that needed a restart resumes when Slicer is back.
        slicer.app.connect("startupCompleted()", self._resumePendingInstall)

    def _resumePendingInstall(self) -> None:
        if qt.QSettings().value(PENDING_INSTALL_KEY):
            slicer.util.selectModule(self.moduleName)


class FastSAM3DSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # InteractiveLogic once a network is loaded
        self.worker = None
        self.engineFuture = None
        self.download = None
        self.positive = True
        self.shortcuts = []
        self.promptNode = None
        self.boxNode = None
        self._rebuilding = False
        self._weightChoices = []

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FastSAM3DSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self._segmentEditorNode())
        for name in ("auto", "cuda", "cpu", "mps"):
            self.ui.deviceComboBox.addItem(name)
        for w in (self.ui.downloadProgressBar, self.ui.cancelDownloadButton,
                  self.ui.cpuWarningLabel, self.ui.localWeightsPathLineEdit,
                  self.ui.localWeightsLabel):
            w.setVisible(False)

        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.weightsComboBox.currentIndexChanged.connect(self.onWeightsChanged)
        self.ui.downloadWeightsButton.clicked.connect(self.onDownloadWeights)
        self.ui.cancelDownloadButton.clicked.connect(self.onCancelDownload)
        self.ui.removeWeightsButton.clicked.connect(self.onRemoveWeights)
        self.ui.loadModelButton.clicked.connect(self.onLoadModel)
        self.ui.deviceComboBox.currentIndexChanged.connect(self._dropEngine)
        self.ui.positivePointButton.toggled.connect(lambda on: self._placePoints(on, True))
        self.ui.negativePointButton.toggled.connect(lambda on: self._placePoints(on, False))
        self.ui.boxButton.toggled.connect(self.onBoxToggled)
        self.ui.applyBoxButton.clicked.connect(self.onApplyBox)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.clearButton.clicked.connect(self.onClear)
        self.ui.segmentEditorWidget.connect(
            "currentSegmentIDChanged(QString)", self.onSegmentChanged
        )

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(30)
        self.pollTimer.timeout.connect(self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self._updateButtons()

    def _segmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode(EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(EDITOR_SINGLETON_TAG)
            node = slicer.mrmlScene.AddNode(node)
        return node

    def enter(self) -> None:
        self._installShortcuts()
        self._refreshDependencies()
        if qt.QSettings().value(PENDING_INSTALL_KEY):
            self.onInstallDependencies(resuming=True)

    def exit(self) -> None:
        self._removeShortcuts()
        self._stopPlacing()

    def cleanup(self) -> None:
        self._removeShortcuts()
        self.removeObservers()
        self.pollTimer.stop()
        if self.download is not None:
            self.download.cancel()
        if self.logic is not None:
            self.logic.close()
        elif self.worker is not None:
            self.worker.shutdown()

    def onSceneClosed(self, caller: Any = None, event: Any = None) -> None:
        if self.parent.isEntered:
            self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self._segmentEditorNode())

    def onSceneClose(self, caller: Any = None, event: Any = None) -> None:
        # Sessions hold copies of volumes of the closing scene: drop them.
        self._dropEngine(keepEngine=True)
        self.promptNode = None
        self.boxNode = None

    # -- shortcuts ------------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        if self.shortcuts:
            return
        bindings = {
            "P": lambda: self.ui.positivePointButton.setChecked(True),
            "N": lambda: self.ui.negativePointButton.setChecked(True),
            "T": self.togglePolarity,
            "B": lambda: self.ui.boxButton.setChecked(True),
            "Ctrl+Z": self.onUndo,
            "Esc": self._stopPlacing,
        }
        # Application-wide (clicks happen in the views, not in this panel), but only while the
        # module is shown: created in enter(), deleted in exit().
        for key, callback in bindings.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", callback)
            self.shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self.shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []

    # -- dependencies ---------------------------------------------------------------------

    def _refreshDependencies(self) -> bool:
        from FastSAM3DSlicerLib import deps

        missing = deps.missing()
        if missing:
            self.ui.dependenciesStatusLabel.text = _("missing: ") + ", ".join(
                r.text for r in missing
            )
            self.ui.installDependenciesButton.setVisible(True)
        else:
            self.ui.dependenciesStatusLabel.text = _("installed")
            self.ui.installDependenciesButton.setVisible(False)
            self._refreshWeights()
        self._updateButtons()
        return not missing

    def onInstallDependencies(self, resuming: bool = False) -> bool:
        """The single first-use dialog; torch via PyTorchUtils, the rest via Slicer's pip."""
        from FastSAM3DSlicerLib import deps

        missing = deps.missing()
        if not missing:
            qt.QSettings().remove(PENDING_INSTALL_KEY)
            return self._refreshDependencies()
        if not resuming and not slicer.app.testingEnabled():
            if not slicer.util.confirmOkCancelDisplay(deps.plan_text(missing),
                                                      windowTitle=_("FastSAM3D setup")):
                return False
        qt.QSettings().setValue(PENDING_INSTALL_KEY, "1")  # before anything may restart
        try:
            if any(r.name == "torch" for r in missing) and not self._installTorch():
                return False  # a restart is pending; the install resumes after it
            pip_reqs = [r.text for r in deps.missing() if r.name != "torch"]
            if pip_reqs:
                packaging = getattr(slicer, "packaging", None)
                if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.11
                    packaging.pip_ensure(pip_reqs, requester="FastSAM3D", prompt_install=False)
                else:
                    slicer.util.pip_install(" ".join(pip_reqs))
        except Exception as e:
            qt.QSettings().remove(PENDING_INSTALL_KEY)  # do not retry at every start-up
            logging.exception("FastSAM3D dependency installation failed")
            slicer.util.errorDisplay(_("Installing dependencies failed: ") + str(e))
            return False
        ok = self._refreshDependencies()
        if ok:
            qt.QSettings().remove(PENDING_INSTALL_KEY)
        return ok

    def _installTorch(self) -> bool:
        try:
            import PyTorchUtils
        except ImportError:
            # The PyTorch extension is a dependency of ours; it can be missing when this module
            # was loaded from source. Install it from the Extensions server, then restart.
            manager = slicer.app.extensionsManagerModel()
            if hasattr(manager, "installExtensionFromServer"):
                if not manager.installExtensionFromServer("PyTorch", True):
                    raise RuntimeError("could not install the PyTorch extension") from None
                return False
            raise RuntimeError(
                "the PyTorch extension is required: install 'PyTorch' from the Extensions "
                "Manager, restart Slicer and open FastSAM3D again"
            ) from None
        from FastSAM3DSlicerLib import deps

        logic = PyTorchUtils.PyTorchUtilsLogic()
        kwargs = {}
        params = inspect.signature(logic.installTorch).parameters
        if "askConfirmation" in params:
            kwargs["askConfirmation"] = False  # our own dialog already asked
        if "torchVersionRequirement" in params:
            kwargs["torchVersionRequirement"] = deps.TORCH_REQUIREMENT
        # The installer runs light-the-torch in a subprocess and pumps Qt events for each line
        # it prints, so this dialog stays alive while it works (minutes, GBs for CUDA builds).
        progress = slicer.util.createProgressDialog(
            maximum=0, windowTitle=_("FastSAM3D setup"),
            labelText=_("Installing PyTorch through the PyTorch extension; this can take "
                        "several minutes. Details appear in the Python console."),
        )
        try:
            with slicer.util.WaitCursor():
                torch = logic.installTorch(**kwargs)
        finally:
            progress.close()
        if torch is None:
            raise RuntimeError("PyTorch was not installed (see the Python console for details)")
        return True

    # -- weights --------------------------------------------------------------------------

    def _refreshWeights(self) -> None:
        if self._weightChoices:
            self._showWeightsStatus()
            return
        from FastSAM3DSlicerLib import weights

        try:
            self._weightChoices = weights.choices()
        except ImportError as e:
            self.ui.weightsStatusLabel.text = str(e)
            return
        self.ui.weightsComboBox.blockSignals(True)
        for c in self._weightChoices:
            self.ui.weightsComboBox.addItem(c.label, c.key)
        self.ui.weightsComboBox.blockSignals(False)
        self._showWeightsStatus()

    def _selectedWeights(self):
        index = self.ui.weightsComboBox.currentIndex
        return self._weightChoices[index] if 0 <= index < len(self._weightChoices) else None

    def onWeightsChanged(self, index: Any = None) -> None:
        """Another network was chosen: the loaded one and its sessions no longer apply."""
        self._showWeightsStatus()
        self._dropEngine()

    def _showWeightsStatus(self) -> None:
        from FastSAM3DSlicerLib import engine, weights

        choice = self._selectedWeights()
        if choice is None:
            return
        local = choice.key == engine.LOCAL_FILE
        self.ui.localWeightsPathLineEdit.setVisible(local)
        self.ui.localWeightsLabel.setVisible(local)
        self.ui.weightsLicenseLabel.text = choice.license_note
        self.ui.weightsStatusLabel.text = choice.description if local else (
            weights.status_text(choice.key)
        )
        self._updateButtons()

    def onDownloadWeights(self) -> None:
        from FastSAM3DSlicerLib import weights

        choice = self._selectedWeights()
        if choice is None or self.download is not None:
            return
        with slicer.util.WaitCursor():
            size = weights.remote_size(choice.key)
        if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
            _("Download {label} ({size}) into your user cache?\n\n{license}").format(
                label=choice.label, size=weights.human_size(size), license=choice.license_note
            ),
            windowTitle=_("Download model"),
        ):
            return
        self.download = weights.DownloadTask(choice.key).start()
        self.ui.downloadProgressBar.setVisible(True)
        self.ui.cancelDownloadButton.setVisible(True)
        self.ui.downloadProgressBar.setMaximum(100)
        self.pollTimer.start()
        self._updateButtons()

    def onCancelDownload(self) -> None:
        if self.download is not None:
            self.download.cancel()

    def _pollDownload(self) -> None:
        from FastSAM3DSlicerLib import weights

        task = self.download
        if task.total:
            self.ui.downloadProgressBar.setValue(int(100 * task.done / task.total))
            self.ui.downloadProgressBar.setFormat(
                f"%p% of {weights.human_size(task.total)}"
            )
        if not task.finished:
            return
        self.download = None
        self.ui.downloadProgressBar.setVisible(False)
        self.ui.cancelDownloadButton.setVisible(False)
        if task.error is not None:
            slicer.util.errorDisplay(_("Download failed: ") + str(task.error))
        elif task.cancelled:
            self.ui.statusLabel.text = _("Download cancelled; nothing was kept.")
        self._showWeightsStatus()

    def onRemoveWeights(self) -> None:
        from FastSAM3DSlicerLib import weights

        choice = self._selectedWeights()
        if choice is None or choice.key == "local-file":
            return
        if not slicer.util.confirmYesNoDisplay(
            _("Delete the downloaded {label} weights from your cache?").format(label=choice.label)
        ):
            return
        self._dropEngine()
        weights.remove(choice.key)
        self._showWeightsStatus()

    # -- model ----------------------------------------------------------------------------

    def _dropEngine(self, index: Any = None, keepEngine: bool = False) -> None:
        """Forget the loaded network (new weights or device) and every session."""
        if self.logic is not None and self.logic.busy:
            return
        if self.logic is not None and not keepEngine:
            self.logic = None
            self.ui.deviceLabel.text = _("model not loaded")
            self.ui.cpuWarningLabel.setVisible(False)
        elif self.logic is not None:
            self.logic.forget_sessions()
        self._updateButtons()

    def onLoadModel(self) -> None:
        from FastSAM3DSlicerLib import engine, weights
        from FastSAM3DSlicerLib.worker import InferenceWorker

        if self.engineFuture is not None:
            return
        if not self._refreshDependencies() and not self.onInstallDependencies():
            return
        choice = self._selectedWeights()
        if choice is None:
            return
        localPath = self.ui.localWeightsPathLineEdit.currentPath
        if choice.key != engine.LOCAL_FILE and not weights.is_downloaded(choice.key):
            self.onDownloadWeights()
            self.ui.statusLabel.text = _("Load the model again once the download has finished.")
            return
        if self.worker is None:
            self.worker = InferenceWorker()
        device = self.ui.deviceComboBox.currentText
        # Loaded on the inference thread: the network's first CUDA work (and cuDNN's per-thread
        # caches) must happen where every later click runs.
        self.engineFuture = self.worker.submit(
            engine.FastSAM3DEngine.load, choice.key, device, localPath or None
        )
        self.ui.deviceLabel.text = _("loading...")
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        self.pollTimer.start()
        self._updateButtons()

    def _pollEngine(self) -> None:
        from FastSAM3DSlicerLib.logic import InteractiveLogic

        future = self.engineFuture
        if not future.done():
            return
        self.engineFuture = None
        qt.QApplication.restoreOverrideCursor()
        try:
            eng = future.result()
        except Exception as e:
            logging.exception("FastSAM3D model loading failed")
            self.ui.deviceLabel.text = _("model not loaded")
            slicer.util.errorDisplay(_("Loading the model failed: ") + str(e))
            self._updateButtons()
            return
        self.logic = InteractiveLogic(eng, self.worker)
        self.ui.deviceLabel.text = f"{eng.device_info.description} [{eng.device}]"
        self.ui.cpuWarningLabel.setVisible(eng.device_info.is_cpu)
        self._updateButtons()

    # -- prompts --------------------------------------------------------------------------

    def _target(self):
        editor = self.ui.segmentEditorWidget
        volume = editor.sourceVolumeNode() if hasattr(editor, "sourceVolumeNode") else (
            editor.masterVolumeNode()
        )
        return volume, editor.segmentationNode(), editor.currentSegmentID()

    def _ensureLogicTarget(self) -> bool:
        if self.logic is None:
            if self.engineFuture is None:
                self.onLoadModel()
            self.ui.statusLabel.text = _("Loading the model; place the prompt again when ready.")
            return False
        volume, segmentation, segmentID = self._target()
        self.logic.set_target(volume, segmentation, segmentID,
                              self.ui.segmentEditorWidget.mrmlSegmentEditorNode())
        return True

    def _ensurePromptNode(self):
        node = self.promptNode
        if node is None or node.GetScene() is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                      "FastSAM3D prompts")
            node.SetAttribute(PROMPTS_ATTRIBUTE, "1")
            node.SetMarkupLabelFormat("")
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*POSITIVE_COLOR)  # selected flag = positive point
            display.SetColor(*NEGATIVE_COLOR)
            display.SetPointLabelsVisibility(False)
            node.SetSaveWithScene(False)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                             self.onPointPlaced)
            self.promptNode = node
        return node

    def _ensureBoxNode(self):
        node = self.boxNode
        if node is None or node.GetScene() is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "FastSAM3D box")
            node.SetAttribute(BOX_ATTRIBUTE, "1")
            node.CreateDefaultDisplayNodes()
            node.SetSaveWithScene(False)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                             self.onBoxPlaced)
            self.boxNode = node
        return node

    def _placeMode(self, node: Any, persistent: bool = True) -> None:
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1 if persistent else 0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def _stopPlacing(self) -> None:
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        for button in (self.ui.positivePointButton, self.ui.negativePointButton,
                       self.ui.boxButton):
            button.blockSignals(True)
            button.setChecked(False)
            button.blockSignals(False)

    def _placePoints(self, on: bool, positive: bool) -> None:
        if not on:
            if not (self.ui.positivePointButton.checked or self.ui.negativePointButton.checked):
                self._stopPlacing()
            return
        self._setPolarity(positive)
        self.ui.boxButton.setChecked(False)
        self._placeMode(self._ensurePromptNode())

    def _setPolarity(self, positive: bool) -> None:
        self.positive = positive
        for button, state in ((self.ui.positivePointButton, positive),
                              (self.ui.negativePointButton, not positive)):
            button.blockSignals(True)
            button.setChecked(state)
            button.blockSignals(False)
        self.ui.polarityLabel.text = (_("Next point: positive (green)") if positive
                                      else _("Next point: negative (red)"))

    def togglePolarity(self) -> None:
        self._setPolarity(not self.positive)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPointPlaced(self, caller: Any, event: Any, callData: Any = None) -> None:
        if self._rebuilding:
            return
        node = caller
        # The event names the point; the last one may be the placement preview instead.
        n = int(callData) if callData is not None else node.GetNumberOfControlPoints() - 1
        if n < 0 or node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
            return
        node.SetNthControlPointSelected(n, self.positive)
        node.SetNthControlPointLocked(n, True)
        pointID = node.GetNthControlPointID(n)
        world = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n, world)
        if not self._ensureLogicTarget():
            self._removeMarker(pointID)
            return
        self._submit(lambda: self.logic.add_point(world, self.positive, tag=pointID), pointID)

    def onBoxToggled(self, on: bool) -> None:
        if not on:
            self._stopPlacing()
            return
        for button in (self.ui.positivePointButton, self.ui.negativePointButton):
            button.blockSignals(True)
            button.setChecked(False)
            button.blockSignals(False)
        node = self._ensureBoxNode()
        node.RemoveAllControlPoints()
        self._placeMode(node, persistent=False)  # one box, then back to normal interaction

    def onBoxPlaced(self, caller: Any, event: Any) -> None:
        if self._rebuilding or not caller.GetControlPointPlacementComplete():
            return
        self.ui.boxButton.setChecked(False)
        self.onApplyBox()

    def onApplyBox(self) -> None:
        node = self.boxNode
        if node is None or node.GetNumberOfDefinedControlPoints() == 0:
            self.ui.statusLabel.text = _("Draw a box first (B).")
            return
        if not self._ensureLogicTarget():
            return
        self._submit(lambda: self.logic.add_roi(node, tag="box"), None)

    def _submit(self, call: Callable[[], Any], pointID: str | None) -> None:
        from FastSAM3DSlicerLib import geometry, logic, mrml

        try:
            call()
        except (geometry.PromptOutsideVolumeError, logic.NoTargetError, mrml.GeometryError,
                ValueError, KeyError) as e:
            if pointID is not None:
                self._removeMarker(pointID)
            self.ui.statusLabel.text = str(e)
            slicer.util.showStatusMessage(str(e), 5000)
            return
        self.ui.statusLabel.text = _("Segmenting...")
        if not qt.QApplication.overrideCursor():
            qt.QApplication.setOverrideCursor(qt.Qt.BusyCursor)
        self.pollTimer.start()
        self._updateButtons()

    def _removeMarker(self, pointID: Any) -> None:
        node = self.promptNode
        if node is None or pointID is None or pointID == "box":
            return
        index = node.GetNthControlPointIndexByID(pointID)
        if index >= 0:
            node.RemoveNthControlPoint(index)

    def onPoll(self) -> None:
        if self.download is not None:
            self._pollDownload()
        if self.engineFuture is not None:
            self._pollEngine()
        if self.logic is not None and self.logic.busy:
            from FastSAM3DSlicerLib.logic import FailedEdit

            for item in self.logic.poll():
                if isinstance(item, FailedEdit):
                    self._removeMarker(item.prompt.tag)
                    self.ui.statusLabel.text = _("Segmentation failed: ") + str(item.error)
                    logging.error("FastSAM3D prediction failed: %s", item.error)
                else:
                    self.ui.latencyLabel.text = _(
                        "Last click: {total:.0f} ms (network {net:.0f} ms), {voxels} voxels"
                    ).format(total=1000 * item.total_s, net=1000 * item.inference_s,
                             voxels=item.voxels)
                    self.ui.statusLabel.text = ""
            if not self.logic.busy:
                qt.QApplication.restoreOverrideCursor()
        idle = (self.download is None and self.engineFuture is None
                and (self.logic is None or not self.logic.busy))
        if idle:
            self.pollTimer.stop()
        self._updateButtons()

    def onUndo(self) -> None:
        if self.logic is None or self.logic.busy or not self._ensureLogicTarget():
            return
        with slicer.util.WaitCursor():
            prompt = self.logic.undo()
        if prompt is None:
            self.ui.statusLabel.text = _("Nothing to undo for this segment.")
        else:
            self._removeMarker(prompt.tag)
        self._updateButtons()

    def onClear(self) -> None:
        if self.logic is None or self.logic.busy or not self._ensureLogicTarget():
            return
        for prompt in self.logic.clear():
            self._removeMarker(prompt.tag)
        if self.boxNode is not None:
            self.boxNode.RemoveAllControlPoints()
        self._updateButtons()

    def onSegmentChanged(self, segmentID: Any = None) -> None:
        """Each segment has its own session: show only its prompts."""
        if self.promptNode is None:
            return
        self._rebuilding = True
        try:
            self.promptNode.RemoveAllControlPoints()
            if self.logic is None or not self._ensureLogicTarget():
                return
            for prompt in self.logic.prompts():
                if prompt.kind != "point":
                    continue
                n = self.promptNode.AddControlPointWorld(vtk.vtkVector3d(*prompt.world))
                self.promptNode.SetNthControlPointSelected(n, prompt.positive)
                self.promptNode.SetNthControlPointLocked(n, True)
                prompt.tag = self.promptNode.GetNthControlPointID(n)
        finally:
            self._rebuilding = False

    def _updateButtons(self) -> None:
        busy = self.logic is not None and self.logic.busy
        loading = self.engineFuture is not None
        downloading = self.download is not None
        self.ui.downloadWeightsButton.enabled = bool(self._weightChoices) and not downloading
        self.ui.removeWeightsButton.enabled = bool(self._weightChoices) and not downloading
        self.ui.loadModelButton.enabled = not loading and not downloading
        self.ui.undoButton.enabled = self.logic is not None and not busy
        self.ui.clearButton.enabled = self.logic is not None and not busy


class FastSAM3DSlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer's module-logic slot; the real logic is FastSAM3DSlicerLib.logic.InteractiveLogic."""

    def createInteractiveLogic(self, weights: str = "fastsam3d", device: str = "auto",
                               localPath: str | None = None) -> Any:
        from FastSAM3DSlicerLib.engine import FastSAM3DEngine
        from FastSAM3DSlicerLib.logic import InteractiveLogic
        from FastSAM3DSlicerLib.worker import InferenceWorker

        worker = InferenceWorker()
        engine = worker.call(FastSAM3DEngine.load, weights, device, localPath)
        return InteractiveLogic(engine, worker)


class FastSAM3DSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: sample volume, points placed, a segment appears (needs the network).

    The network comes from FASTSAM3D_TEST_CHECKPOINT (a local file) or the downloaded
    FastSAM3D weights; without either the test uses the fixture-weight network, which checks
    the whole chain (MRML, worker thread, writes, undo) but not the mask's quality.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_points_make_a_segment()

    def test_points_make_a_segment(self) -> None:
        import numpy as np
        import SampleData

        from FastSAM3DSlicerLib import deps, engine, weights
        from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic
        from FastSAM3DSlicerLib.worker import InferenceWorker

        if deps.missing():
            self.delayDisplay("FastSAM3D dependencies are not installed; skipping")
            return
        self.delayDisplay("Loading sample data")
        volume = SampleData.downloadSample("MRHead")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentID = segmentation.GetSegmentation().AddEmptySegment("brain")

        worker = InferenceWorker()
        checkpoint = os.environ.get("FASTSAM3D_TEST_CHECKPOINT")
        if checkpoint:
            eng = worker.call(engine.FastSAM3DEngine.load, engine.LOCAL_FILE, "auto", checkpoint)
        elif weights.is_downloaded("fastsam3d"):
            eng = worker.call(engine.FastSAM3DEngine.load, "fastsam3d", "auto")
        else:
            import fastsam3d.testing

            self.delayDisplay("No weights found: using the fixture-weight network")
            eng = worker.call(engine.FastSAM3DEngine.from_model,
                              fastsam3d.testing.fixture_model("fastsam3d"), "cpu",
                              propagate=False)
        logic = InteractiveLogic(eng, worker)
        logic.set_target(volume, segmentation, segmentID)

        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        center = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2,
                  (bounds[4] + bounds[5]) / 2]
        for offset in (0.0, 10.0):
            world = [center[0] + offset, center[1], center[2]]
            points.AddControlPointWorld(vtk.vtkVector3d(*world))
            logic.add_point(world, True)
        results = logic.wait()
        for r in results:
            self.assertNotIsInstance(r, FailedEdit, getattr(r, "error", None))
        self.delayDisplay(f"Last click: {1000 * results[-1].total_s:.0f} ms on {eng.device}")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume)
        if checkpoint or weights.is_downloaded("fastsam3d"):
            self.assertGreater(int(np.count_nonzero(mask)), 100, "no segment appeared")
        else:
            # Fixture weights give an arbitrary mask: check that the segment holds exactly it.
            self.assertEqual(int(np.count_nonzero(mask)), results[-1].voxels)
        logic.undo()
        logic.undo()
        after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume)
        self.assertEqual(int(np.count_nonzero(after)), 0, "undo did not restore the segment")
        logic.close()
        self.delayDisplay("Test passed")
