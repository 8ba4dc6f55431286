"""FastSAM3D interactive 3D segmentation for 3D Slicer: the module, its parameter node, a thin
Widget, the module logic and the self-test (the layout of Slicer's scripted-module template).

The Widget only wires the panel to the Lib: everything that does not need Qt lives in
FastSAM3DSlicerLib (tested with slicer-core in plain pytest): the setup flow (setup_flow), prompt
capture and targets (interaction), markers (markers), the interactive logic (logic). The Qt side
beside it is FastSAM3DSlicerQt: slice-view capture, the masking section, the install dialogs.
Nothing heavy happens at import time: the Lib, numpy, torch and fastsam3d are imported inside
methods, at first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
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


#: Seconds one poll may keep the UI in its pumped wait before the progress text is refreshed.
PROGRESS_EVERY_S = 0.5
#: A prediction running this long also shows its elapsed time in Slicer's status bar.
LONG_PREDICTION_S = 2.0

#: Keys while the module is shown (docs/slicer.md). None is one of SlicerNNInteractive's
#: permanent shortcuts (p b l s e r t v Delete Ctrl+Z: two QShortcuts on one key fire neither)
#: or a key Slicer's slice views use (g t f b v r [ ] { } arrows).
SHORTCUTS = (
    ("A", "onPositive"),
    ("X", "onNegative"),
    ("Q", "togglePolarity"),
    ("U", "onUndo"),
    ("C", "onResetSegment"),
    ("N", "onNewSegment"),
    ("Shift+Delete", "onDeleteSegment"),
    ("H", "onToggleSegmentVisibility"),
    ("Esc", "onStopPrompting"),
)

#
# FastSAM3DSlicer
#


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
        from FastSAM3DSlicerLib import install

        problem = install.version_problem(f"{slicer.app.majorVersion}.{slicer.app.minorVersion}")
        if problem:  # shown again in the Setup section and refused by the install step
            logging.error(problem)
            self.parent.helpText = problem + "\n\n" + self.parent.helpText
        # An install that needed a restart resumes when Slicer is back (bounded: no loop).
        slicer.app.connect("startupCompleted()", self._resumePendingInstall)

    def _resumePendingInstall(self) -> None:
        from FastSAM3DSlicerLib import install

        if install.resume_at_startup(qt.QSettings()):
            slicer.util.selectModule(self.moduleName)


#
# FastSAM3DSlicerParameterNode
#


@parameterNodeWrapper
class FastSAM3DSlicerParameterNode:
    """The user's choices, saved with the scene: the weights key, the device and the next
    point's polarity. A new scene's node starts from the per-user preferences (Lib
    params.Preferences, QSettings), which follow every change. The backend, server URL and API
    key are not here: they are per-user settings (Lib backends), and a key never enters a scene.
    """

    weights: str = "fastsam3d"
    device: str = "auto"
    positive: bool = True


#
# FastSAM3DSlicerWidget
#


class FastSAM3DSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the panel to the Lib; slots are camelCase, the rules live in FastSAM3DSlicerLib."""

    def __init__(self, parent: Any = None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        from FastSAM3DSlicerQt.masking import MaskingSection
        from FastSAM3DSlicerQt.slice_views import SliceViews

        from FastSAM3DSlicerLib import markers, setup_flow

        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # InteractiveLogic once a network is loaded
        self.moduleLogic = None  # FastSAM3DSlicerLogic: the parameter node
        self._parameterNode = None
        self.modelSetup = setup_flow.ModelSetup()  # download and load in flight, the worker
        self.capture = None  # interaction.PromptCapture: click/drag decisions and polarity
        self.markers = markers.PromptMarkers(slicer.mrmlScene)
        self.shortcuts = []
        self.views = SliceViews(self.onViewEvent, self._onPrompt, self._status)
        self.masking = MaskingSection(None, self._onEditorEffect)
        self.deferred = []  # prompts given before the model was loaded: (prompt, tag, target)
        self._polling = False
        self._promptOnEnter = False
        self._weightChoices = []
        self._probingSize = False  # the weights size request is in flight (m9)
        self.backend = None  # backends.BackendSettings: local / ONNX / remote (QSettings)

    @property
    def engineFuture(self) -> Any:
        """The engine being loaded (a future on the inference worker), or None."""
        return self.modelSetup.future

    @property
    def editorNode(self) -> Any:
        return self.masking.editorNode

    def _choices(self) -> FastSAM3DSlicerParameterNode:
        """The parameter node (created again after a scene close)."""
        if self._parameterNode is None:
            self.initializeParameterNode()
        return self._parameterNode

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        from FastSAM3DSlicerLib import interaction, params
        from FastSAM3DSlicerLib.waiting import POLL_INTERVAL_MS

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FastSAM3DSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.moduleLogic = FastSAM3DSlicerLogic()
        self.capture = interaction.PromptCapture()
        self.initializeParameterNode()
        self._setupBackend()
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.masking.ui = self.ui
        self.masking.connect()
        self.masking.select()
        for name in params.DEVICES:
            self.ui.deviceComboBox.addItem(name)
        self.ui.deviceComboBox.setCurrentIndex(params.DEVICES.index(self._choices().device))
        for w in (
            self.ui.downloadProgressBar,
            self.ui.cancelDownloadButton,
            self.ui.cpuWarningLabel,
            self.ui.localWeightsPathLineEdit,
            self.ui.localWeightsLabel,
        ):
            w.setVisible(False)

        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.weightsComboBox.currentIndexChanged.connect(self.onWeightsChanged)
        self.ui.downloadWeightsButton.clicked.connect(self.onDownloadWeights)
        self.ui.cancelDownloadButton.clicked.connect(self.modelSetup.cancel_download)
        self.ui.removeWeightsButton.clicked.connect(self.onRemoveWeights)
        self.ui.loadModelButton.clicked.connect(self.onLoadModel)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.positivePointButton.toggled.connect(lambda on: self._onPolarityButton(on, True))
        self.ui.negativePointButton.toggled.connect(lambda on: self._onPolarityButton(on, False))
        for button, action in (
            (self.ui.applyBoxButton, self.onApplyBox),
            (self.ui.undoButton, self.onUndo),
            (self.ui.resetSegmentButton, self.onResetSegment),
            (self.ui.clearButton, self.onClear),
            (self.ui.newSegmentButton, self.onNewSegment),
        ):
            button.clicked.connect(self._guarded(action))
        self.ui.segmentEditorWidget.connect(
            "currentSegmentIDChanged(QString)", self.onSegmentChanged
        )

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.timeout.connect(self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(
            interactionNode,
            interactionNode.InteractionModeChangedEvent,
            self.onInteractionModeChanged,
        )
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:  # new slice views appear with a new layout
            layoutManager.connect("layoutChanged(int)", self.onLayoutChanged)
        self._showPolarity()
        self._updateButtons()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists; a new one starts from the user's preferences."""
        from FastSAM3DSlicerLib import params

        if self.moduleLogic is None:
            self.moduleLogic = FastSAM3DSlicerLogic()
        preferences = params.Preferences.load(qt.QSettings())
        self._parameterNode = self.moduleLogic.getParameterNode(preferences)
        if self.capture is not None:
            self.capture.positive = bool(self._parameterNode.positive)

    def enter(self) -> None:
        """Called each time the user opens this module: keys and view capture start here."""
        from FastSAM3DSlicerLib import install

        self.initializeParameterNode()
        self.masking.select()
        self.ui.segmentEditorWidget.updateWidgetFromMRML()
        self._installShortcuts()
        self._installViewFilters()
        self._refreshDependencies()
        if install.PendingInstall(qt.QSettings()).active:
            self.onInstallDependencies(resuming=True)
        if self._promptOnEnter:
            self._setPrompting(True)

    def exit(self) -> None:
        """Called when the user leaves: nothing of this module keeps acting on the views."""
        self._promptOnEnter = bool(self.capture and self.capture.active)
        self._stopViews()
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)  # a Paint/Draw effect would keep taking view clicks
        editor.removeViewObservations()
        self._removeShortcuts()

    def _stopViews(self) -> None:
        """Stop prompting, restore the views' cursors and take the event filters off."""
        if self.capture is not None:
            self._setPrompting(False)
        self._removeViewFilters()

    def cleanup(self) -> None:
        """Called when the application closes the module: stop everything this module runs."""
        self._stopViews()
        self._removeShortcuts()
        self.removeObservers()
        self.masking.removeObservers()
        self.pollTimer.stop()
        try:
            slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
            layoutManager = slicer.app.layoutManager()
            if layoutManager is not None:
                layoutManager.disconnect("layoutChanged(int)", self.onLayoutChanged)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._shutdownWork()

    def onAboutToQuit(self) -> None:
        """Slicer is quitting (cleanup may come too late): no prediction or download holds it."""
        self._stopViews()
        self._shutdownWork()

    def _shutdownWork(self) -> None:
        """Drop deferred prompts, the load and the download; close the engine and the worker."""
        self.deferred = []
        if self.modelSetup.shutdown(keep_worker=self.logic is not None):
            qt.QApplication.restoreOverrideCursor()  # set while the model was loading
        if self.logic is not None:
            self._closeEngine(self.logic.engine)
            self.logic.close()

    def onSceneClose(self, caller: Any = None, event: Any = None) -> None:
        """Called just before the scene is closed: its nodes, prompts and sessions go; the
        network stays loaded."""
        if self.capture is not None:
            self.capture.cancel()
        self.views.hideOutline()
        self.deferred = []  # their markers go with the scene
        if self.logic is not None:
            # Even while predicting: results of the closed scene come back as stale and are
            # dropped, never written into a new scene's nodes that reuse the old IDs (M8).
            self.logic.forget_sessions()
        self.markers.forget()
        self._parameterNode = None
        editor = self.ui.segmentEditorWidget  # as the Segment Editor module does
        editor.setSegmentationNode(None)
        editor.removeViewObservations()
        self.masking.release()

    def onSceneClosed(self, caller: Any = None, event: Any = None) -> None:
        """Called just after the scene is closed: a shown module takes the new scene's nodes."""
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.masking.select()

    def _onEditorEffect(self) -> None:
        """An editor effect (Paint, Draw...) takes left clicks in the views from now on."""
        if self.capture is not None and self.capture.active:
            self._setPrompting(
                False,
                message=_(
                    "Prompting paused while a Segment Editor effect is active; press A or X to "
                    "prompt again."
                ),
            )

    # -- shortcuts and errors -------------------------------------------------------------

    def _installShortcuts(self) -> None:
        if self.shortcuts:
            return
        # Application-wide (clicks happen in the views, not in this panel), but only while the
        # module is shown: created in enter(), deleted in exit(). Text fields keep their keys.
        for key, method in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", self._guarded(getattr(self, method)))
            self.shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self.shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []

    def _guarded(self, action: Callable[..., Any], message: str = "") -> Callable[..., None]:
        """A slot whose unexpected error shows in Slicer's error display, not only the log."""

        def run(*args: Any) -> None:
            with slicer.util.tryWithErrorDisplay(
                message or _("FastSAM3D: this action failed."), waitCursor=False
            ):
                action()

        return run

    # -- backend: local PyTorch, local ONNX Runtime, remote server (Lib/backends.py) ------
    def _setupBackend(self) -> None:
        """The backend choice, from the user's settings; the key stays in memory unless
        "remember" is ticked (then in QSettings), never in the scene or a log."""
        from FastSAM3DSlicerLib import backends

        self.backend = backends.BackendSettings.load(qt.QSettings())
        usable, why = backends.onnx_status()
        combo = self.ui.backendComboBox
        combo.blockSignals(True)
        for key, label in backends.CHOICES:
            if key != backends.ONNX or usable:
                combo.addItem(_(label), key)
        if self.backend.kind == backends.ONNX and not usable:
            self.backend.kind = backends.LOCAL
        self._backendKeys = [k for k, _l in backends.CHOICES if k != backends.ONNX or usable]
        combo.setCurrentIndex(self._backendKeys.index(self.backend.kind))
        combo.blockSignals(False)
        combo.toolTip = _(
            "Where the network runs. Remote: a fastsam3d server (no PyTorch "
            "here). ONNX Runtime: this computer without PyTorch."
        ) + ("" if usable else "\n" + _("ONNX Runtime is not offered: ") + why)
        self.ui.serverUrlLineEdit.text = self.backend.url
        self.ui.apiKeyLineEdit.text = self.backend.api_key
        self.ui.rememberApiKeyCheckBox.checked = self.backend.remember_key
        combo.currentIndexChanged.connect(self.onBackendChanged)
        self.ui.serverUrlLineEdit.editingFinished.connect(self.onServerSettingsChanged)
        self.ui.apiKeyLineEdit.editingFinished.connect(self.onServerSettingsChanged)
        self.ui.rememberApiKeyCheckBox.toggled.connect(self.onServerSettingsChanged)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self._showBackend()

    def _backendKind(self) -> str:
        return self.backend.kind if self.backend is not None else "local"

    def _backendMissing(self) -> list:
        """What the chosen backend needs and lacks: remote and ONNX never ask for torch."""
        from FastSAM3DSlicerLib import backends

        return backends.missing(self._backendKind())

    def _readBackendFields(self) -> None:
        from FastSAM3DSlicerLib import backends

        index = self.ui.backendComboBox.currentIndex
        keys = getattr(self, "_backendKeys", [k for k, _l in backends.CHOICES])
        self.backend.kind = keys[index] if 0 <= index < len(keys) else backends.LOCAL
        self.backend.url = str(self.ui.serverUrlLineEdit.text).strip()
        self.backend.api_key = str(self.ui.apiKeyLineEdit.text).strip()
        self.backend.remember_key = bool(self.ui.rememberApiKeyCheckBox.checked)
        self.backend.save(qt.QSettings())

    def onBackendChanged(self, index: Any = None) -> None:
        """Another backend: the loaded engine and its sessions no longer apply."""
        self._readBackendFields()
        self._dropEngine()
        self._showBackend()
        self._refreshDependencies()

    def onServerSettingsChanged(self, *args: Any) -> None:
        before = (self.backend.url, self.backend.api_key)
        self._readBackendFields()
        if self._backendKind() == "remote" and (self.backend.url, self.backend.api_key) != before:
            self._dropEngine()  # sessions live on the old server / under the old key

    def onTestConnection(self) -> Any:
        """Ask the server (on a thread, the UI pumped): model and device, or why not."""
        from FastSAM3DSlicerLib import backends, waiting

        self._readBackendFields()
        self.ui.testConnectionButton.enabled = False
        self.ui.backendStatusLabel.text = _("testing...")
        try:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                future = pool.submit(
                    backends.check_connection, self.backend.url, self.backend.api_key
                )
                waiting.wait_pumping(future, slicer.app.processEvents)
                report = future.result()
        except Exception as e:  # noqa: BLE001 - shown to the user
            report = backends.ConnectionReport(False, f"{type(e).__name__}: {e}")
        finally:
            self.ui.testConnectionButton.enabled = True
        self.ui.backendStatusLabel.text = report.message
        return report

    def _showBackend(self) -> None:
        remote = self._backendKind() == "remote"
        self.ui.remoteSettingsWidget.setVisible(remote)
        for w in (
            self.ui.weightsLabel,
            self.ui.weightsComboBox,
            self.ui.weightsStatusLabel,
            self.ui.weightsLicenseLabel,
            self.ui.downloadWeightsButton,
            self.ui.removeWeightsButton,
            self.ui.deviceSelectorLabel,
            self.ui.deviceComboBox,
        ):
            w.setVisible(not remote)
        if remote:  # shown again by _showWeightsStatus for "Local checkpoint file..."
            self.ui.localWeightsLabel.setVisible(False)
            self.ui.localWeightsPathLineEdit.setVisible(False)
        else:
            self.ui.backendStatusLabel.text = ""
            self._showWeightsStatus()

    def _closeEngine(self, eng: Any) -> None:
        """A remote engine ends its sessions on the server, on a daemon thread."""
        from FastSAM3DSlicerLib import setup_flow

        self._closingThread = setup_flow.close_in_background(eng)

    # -- setup: dependencies, weights, model (Lib setup_flow) ------------------------------

    def _refreshDependencies(self) -> bool:
        """Show what the chosen backend lacks; True when nothing is missing."""
        from FastSAM3DSlicerLib import setup_flow

        version = f"{slicer.app.majorVersion}.{slicer.app.minorVersion}"
        report = setup_flow.dependency_report(self._backendKind(), version)
        self.ui.installDependenciesButton.setVisible(
            report.problem is None and bool(report.missing)
        )
        if report.problem:  # a Slicer too old to run the module: say so, offer nothing
            self.ui.dependenciesStatusLabel.text = report.problem
            self.ui.loadModelButton.enabled = False
            return False
        if report.ready and self._backendKind() != "remote":  # a server has its own model
            self._refreshWeights()
        self.ui.dependenciesStatusLabel.text = report.text(_("installed"), _("missing: "))
        self._updateButtons()
        return not report.missing

    def onInstallDependencies(self, resuming: bool = False) -> bool:
        """The first-use install (FastSAM3DSlicerLib.install): one dialog; torch through the
        PyTorch extension in a background process, the UI live; a restart asked for, never
        silent; the rest through Slicer's pip helpers."""
        from FastSAM3DSlicerQt.install_host import SlicerInstallHost

        from FastSAM3DSlicerLib import install

        outcome = install.install_dependencies(
            SlicerInstallHost(), resuming=bool(resuming), missing=self._backendMissing
        )
        ok = self._refreshDependencies()
        return outcome == install.DONE and ok

    def _refreshWeights(self) -> None:
        if self._weightChoices:
            self._showWeightsStatus()
            return
        from FastSAM3DSlicerLib import weights

        try:
            self._weightChoices = weights.choices()
        except Exception as e:  # noqa: BLE001 - e.g. a broken fastsam3d: say it, do not raise
            logging.exception("FastSAM3D: listing the weights failed")
            self.ui.weightsStatusLabel.text = str(e)
            return
        self.ui.weightsComboBox.blockSignals(True)
        for c in self._weightChoices:
            self.ui.weightsComboBox.addItem(c.label, c.key)
        keys = [c.key for c in self._weightChoices]
        if self._choices().weights in keys:
            self.ui.weightsComboBox.setCurrentIndex(keys.index(self._choices().weights))
        self.ui.weightsComboBox.blockSignals(False)
        self._showWeightsStatus()

    def _selectedWeights(self) -> Any:
        index = self.ui.weightsComboBox.currentIndex
        return self._weightChoices[index] if 0 <= index < len(self._weightChoices) else None

    def onWeightsChanged(self, index: Any = None) -> None:
        """Another network was chosen: the loaded one and its sessions no longer apply."""
        self._showWeightsStatus()
        self._saveChoices()
        self._dropEngine()

    def onDeviceChanged(self, index: Any = None) -> None:
        self._saveChoices()
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
        self.ui.weightsStatusLabel.text = (
            choice.description if local else weights.status_text(choice.key)
        )
        self._updateButtons()

    def onDownloadWeights(self) -> None:
        from FastSAM3DSlicerLib import waiting, weights

        choice = self._selectedWeights()
        if choice is None or self.modelSetup.download is not None or self._probingSize:
            return
        # The size comes from a HEAD request on a thread; waiting for it GIL-free with the UI
        # pumped keeps Slicer responsive, and a slow DNS lookup cannot freeze it (m9).
        self._probingSize = True
        self.ui.downloadWeightsButton.enabled = False
        try:
            probe = weights.SizeProbe(choice.key).start()
            waiting.wait_pumping(probe, slicer.app.processEvents, timeout=weights.SIZE_TIMEOUT_S)
            size = probe.size
        finally:
            self._probingSize = False
            self._updateButtons()
        if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
            _("Download {label} ({size}) into your user cache?\n\n{license}").format(
                label=choice.label, size=weights.human_size(size), license=choice.license_note
            ),
            windowTitle=_("Download model"),
        ):
            return
        self.modelSetup.start_download(choice.key)
        self.ui.downloadProgressBar.setVisible(True)
        self.ui.cancelDownloadButton.setVisible(True)
        self.ui.downloadProgressBar.setMaximum(100)
        self.pollTimer.start()
        self._updateButtons()

    def _pollDownload(self) -> None:
        from FastSAM3DSlicerLib import weights

        for event in self.modelSetup.poll_download(slicer.app.processEvents, PROGRESS_EVERY_S):
            if event.kind == "progress":
                self.ui.downloadProgressBar.setValue(int(100 * event.done / event.total))
                self.ui.downloadProgressBar.setFormat(f"%p% of {weights.human_size(event.total)}")
                continue
            self.ui.downloadProgressBar.setVisible(False)
            self.ui.cancelDownloadButton.setVisible(False)
            if event.kind == "download_failed":
                self._dropDeferred("")
                slicer.util.errorDisplay(_("Download failed: ") + str(event.error))
            elif event.kind == "download_cancelled":
                self._dropDeferred("")
                self.ui.statusLabel.text = _("Download cancelled; nothing was kept.")
            elif self.deferred:
                self.onLoadModel()  # prompts are waiting for this model
            self._showWeightsStatus()

    def onRemoveWeights(self) -> None:
        from FastSAM3DSlicerLib import engine, weights

        choice = self._selectedWeights()
        if choice is None or choice.key == engine.LOCAL_FILE:
            return
        if not slicer.util.confirmYesNoDisplay(
            _("Delete the downloaded {label} weights from your cache?").format(label=choice.label)
        ):
            return
        self._dropEngine()
        weights.remove(choice.key)
        self._showWeightsStatus()

    def _dropEngine(self, index: Any = None) -> None:
        """Forget the loaded network (new weights, device or backend) and every session."""
        if self.logic is not None and self.logic.busy:
            return
        self.markers.clear_points()  # their sessions (and undo) are gone
        if self.logic is not None:
            self._closeEngine(self.logic.engine)
            self.logic = None
            self.ui.deviceLabel.text = _("model not loaded")
            self.ui.cpuWarningLabel.setVisible(False)
        self._updateButtons()

    def onLoadModel(self) -> None:
        """Load the chosen network: the dependencies and the weights download first."""
        from FastSAM3DSlicerLib import setup_flow, weights

        if self.modelSetup.future is not None:
            return
        if not self._refreshDependencies() and not self.onInstallDependencies():
            return
        kind = self._backendKind()
        choice = self._selectedWeights()
        if choice is None and kind != "remote":
            return
        request = setup_flow.LoadRequest(
            kind,
            choice.key if choice is not None else "",
            self.ui.deviceComboBox.currentText,
            self.ui.localWeightsPathLineEdit.currentPath or None,
            self.backend,
        )
        if setup_flow.next_step(request, weights.is_downloaded) == setup_flow.DOWNLOAD:
            self.onDownloadWeights()
            self.ui.statusLabel.text = _("Load the model again once the download has finished.")
            return
        if self.logic is not None:
            self._dropEngine()  # sessions of the old network end here, with their markers
        # Loaded on the inference thread: the network's first CUDA work (and cuDNN's per-thread
        # caches) must happen where every later click runs.
        self.modelSetup.start_load(request)
        self.ui.deviceLabel.text = _("loading...")
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        self.pollTimer.start()
        self._updateButtons()

    def _pollEngine(self) -> None:
        from FastSAM3DSlicerLib.logic import InteractiveLogic

        event = self.modelSetup.poll_load(slicer.app.processEvents, PROGRESS_EVERY_S)
        if event is None:
            return
        qt.QApplication.restoreOverrideCursor()
        if event.kind == "load_failed":
            self.ui.deviceLabel.text = _("model not loaded")
            self._dropDeferred("")
            slicer.util.errorDisplay(_("Loading the model failed: ") + str(event.error))
            self._updateButtons()
            return
        eng = event.engine
        if self.logic is None:
            self.logic = InteractiveLogic(eng, self.modelSetup.ensure_worker())
        elif not self.logic.set_engine(eng):  # m1: predictions in flight finish first
            self._status(_("The new model is used once the running predictions are written."))
        self.ui.deviceLabel.text = f"{eng.device_info.description} [{eng.device}]"
        self.ui.cpuWarningLabel.setVisible(eng.device_info.is_cpu)
        self._updateButtons()
        self._runDeferred()

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

    def _saveChoices(self) -> None:
        """The panel's choices into the parameter node, and from it into the preferences."""
        from FastSAM3DSlicerLib import params

        node = self._choices()
        choice = self._selectedWeights()
        if choice is not None:
            node.weights = choice.key
        if self.ui.deviceComboBox.currentText in params.DEVICES:
            node.device = self.ui.deviceComboBox.currentText
        node.positive = self.capture.positive
        params.Preferences.of(node).save(qt.QSettings())

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

        with slicer.util.tryWithErrorDisplay(
            _("FastSAM3D could not use this prompt."), waitCursor=False
        ):
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
        deferred, self.deferred = self.deferred, []
        for prompt, tag, target in deferred:
            self._submitPrompt(prompt, tag, target)

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

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        if text:
            slicer.util.showStatusMessage(text, 5000)

    # -- results and edits ----------------------------------------------------------------

    def onPoll(self) -> None:
        """The timer's tick: a thin call into the Lib, which waits for results GIL-free."""
        if self._polling:
            return  # the Lib's pumped wait below runs the event loop, and so this timer
        self._polling = True
        try:
            if self.modelSetup.download is not None:
                self._pollDownload()
            if self.modelSetup.future is not None:
                self._pollEngine()
            if self.logic is not None and self.logic.busy:
                self._showResults(
                    self.logic.poll(pump=slicer.app.processEvents, max_s=PROGRESS_EVERY_S)
                )
            if self.modelSetup.state == "idle" and (self.logic is None or not self.logic.busy):
                self.pollTimer.stop()
            self._updateButtons()
        finally:
            self._polling = False

    def _showResults(self, results: list) -> None:
        from FastSAM3DSlicerLib import interaction
        from FastSAM3DSlicerLib.logic import FailedEdit, StaleResultError

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
        from FastSAM3DSlicerQt.slice_views import firstViewVolumeID

        from FastSAM3DSlicerLib import interaction

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

    def _updateButtons(self) -> None:
        """Enable the controls as Lib setup_flow.enabled_controls says (review m1)."""
        from FastSAM3DSlicerLib import setup_flow

        states = setup_flow.enabled_controls(
            has_weights=bool(self._weightChoices),
            loaded=self.logic is not None,
            busy=self.logic is not None and self.logic.busy,
            loading=self.modelSetup.future is not None,
            downloading=self.modelSetup.download is not None,
        )
        for name, enabled in states.items():
            getattr(self.ui, name).enabled = enabled


#
# FastSAM3DSlicerLogic
#


class FastSAM3DSlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer's module logic: the parameter node, and an InteractiveLogic without the GUI.
    The interactive logic itself is FastSAM3DSlicerLib.logic.InteractiveLogic."""

    def getParameterNode(self, preferences: Any = None) -> FastSAM3DSlicerParameterNode:
        """The scene's parameter node; a new one takes ``preferences`` (params.Preferences)."""
        raw = ScriptedLoadableModuleLogic.getParameterNode(self)
        fresh = not raw.GetParameter("weights")  # before the wrapper writes its defaults
        node = FastSAM3DSlicerParameterNode(raw)
        if fresh and preferences is not None:
            preferences.apply(node)
        return node

    def createInteractiveLogic(
        self, weights: str = "fastsam3d", device: str = "auto", localPath: str | None = None
    ) -> Any:
        from FastSAM3DSlicerLib import setup_flow
        from FastSAM3DSlicerLib.logic import InteractiveLogic

        flow = setup_flow.ModelSetup()
        request = setup_flow.LoadRequest("local", weights, device, localPath)
        return InteractiveLogic(flow.start_load(request).result(), flow.worker)


#
# FastSAM3DSlicerTest
#


class FastSAM3DSlicerTest(ScriptedLoadableModuleTest):
    """Point, box and undo through the Widget on a phantom volume, each checked against the
    engine's own result; skips without torch; offline (fixture weights when no real ones).
    The body is FastSAM3DSlicerLib/selftest.py."""

    def setUp(self) -> None:
        """Each test starts on an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run as few or as many tests as needed here."""
        from FastSAM3DSlicerLib import selftest

        selftest.run_in_reload_and_test(self)

    def test_prompts_through_the_widget(self) -> None:
        from FastSAM3DSlicerLib import selftest

        selftest.run_widget_prompt_test(self)
