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
import vtk
from FastSAM3DSlicerQt.prompts_panel import PromptsPanel
from FastSAM3DSlicerQt.setup_panel import SetupPanel
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


class FastSAM3DSlicerWidget(
    SetupPanel, PromptsPanel, ScriptedLoadableModuleWidget, VTKObservationMixin
):
    """Wires the panel to the Lib: lifecycle, signals, the timer and the controls here; the
    Setup and Prompts sections' slots in FastSAM3DSlicerQt (setup_panel, prompts_panel, mixed
    in); the rules in FastSAM3DSlicerLib."""

    def __init__(self, parent: Any = None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        from FastSAM3DSlicerQt.masking import MaskingSection
        from FastSAM3DSlicerQt.slice_views import SliceViews

        from FastSAM3DSlicerLib import markers, setup_flow

        VTKObservationMixin.__init__(self)
        self.logic = None  # InteractiveLogic once a network is loaded
        self.moduleLogic = None  # FastSAM3DSlicerLogic: the parameter node
        self._parameterNode = None  # FastSAM3DSlicerParameterNode the panel is bound to
        self._syncingChoices = False  # the panel and the node being brought together
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
        self._dropWhenIdle = False  # the network goes once its predictions are written
        self.backend = None  # backends.BackendSettings: local / ONNX / remote (QSettings)
        # Last: without a parent, the base class calls setup() itself, which needs the above.
        ScriptedLoadableModuleWidget.__init__(self, parent)

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
        self._setupBackend()
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.masking.ui = self.ui
        self.masking.connect()
        self.masking.select()
        for name in params.DEVICES:
            self.ui.deviceComboBox.addItem(name, name)  # text and key alike
        for w in (
            self.ui.downloadProgressBar,
            self.ui.cancelDownloadButton,
            self.ui.cpuWarningLabel,
            self.ui.localWeightsPathLineEdit,
            self.ui.localWeightsLabel,
        ):
            w.setVisible(False)

        self.ui.positivePointButton.toggled.connect(lambda on: self._onPolarityButton(on, True))
        self.ui.negativePointButton.toggled.connect(lambda on: self._onPolarityButton(on, False))
        # Every other slot shows an unexpected error in Slicer's error display (_guarded).
        for signal, action in (
            (self.ui.installDependenciesButton.clicked, self.onInstallDependencies),
            (self.ui.weightsComboBox.currentIndexChanged, self.onWeightsChanged),
            (self.ui.downloadWeightsButton.clicked, self.onDownloadWeights),
            (self.ui.cancelDownloadButton.clicked, self.modelSetup.cancel_download),
            (self.ui.removeWeightsButton.clicked, self.onRemoveWeights),
            (self.ui.loadModelButton.clicked, self.onLoadModel),
            (self.ui.deviceComboBox.currentIndexChanged, self.onDeviceChanged),
            (self.ui.applyBoxButton.clicked, self.onApplyBox),
            (self.ui.undoButton.clicked, self.onUndo),
            (self.ui.resetSegmentButton.clicked, self.onResetSegment),
            (self.ui.clearButton.clicked, self.onClear),
            (self.ui.newSegmentButton.clicked, self.onNewSegment),
        ):
            signal.connect(self._guarded(action))
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
        self.initializeParameterNode()  # the panel shows the node's choices (the combos are filled)
        self._showPolarity()
        self._updateButtons()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and bind the panel to it; a new one starts from
        the user's preferences."""
        from FastSAM3DSlicerLib import params

        if self.moduleLogic is None:
            self.moduleLogic = FastSAM3DSlicerLogic()
        preferences = params.Preferences.load(qt.QSettings())
        self.setParameterNode(self.moduleLogic.getParameterNode(preferences))

    def setParameterNode(self, node: FastSAM3DSlicerParameterNode | None) -> None:
        """Bind the panel to ``node`` both ways (None: unbind), as the template's connectGui
        does: the panel shows the node's choices now and whenever the node changes (a scene
        imported over it), and the user's changes go into the node (_saveChoices). Not
        connectGui itself: the weights combo shows labels while the node holds keys (item data).
        """
        self._observeChoices(False)
        self._parameterNode = node
        if node is not None:
            self._observeChoices(True)
            self._showChoices()

    def _observeChoices(self, on: bool) -> None:
        """Follow the bound node's changes (on) or stop (off: the module is left)."""
        if self._parameterNode is None:
            return
        raw, event = self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent
        observed = self.hasObserver(raw, event, self._onParameterNodeModified)
        if on and not observed:
            # Below the wrapper's own observers (priority 0), which refresh its cached values:
            # VTK calls equal priorities out of order, so at 0 this could read stale ones.
            self.addObserver(raw, event, self._onParameterNodeModified, priority=-1.0)
        elif observed and not on:
            self.removeObserver(raw, event, self._onParameterNodeModified)

    def _onParameterNodeModified(self, caller: Any = None, event: Any = None) -> None:
        self._showChoices()

    def enter(self) -> None:
        """Called each time the user opens this module: keys and view capture start here."""
        from FastSAM3DSlicerLib import install

        self.initializeParameterNode()  # binds the panel again (exit unbinds it)
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
        self._observeChoices(False)
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

    def onReload(self) -> None:
        """Developer mode's Reload: Slicer executes this file again, not the modules it
        imports, so the panel's slots (FastSAM3DSlicerQt) are dropped first and imported anew.
        The Lib stays: the running work holds its classes until cleanup()."""
        import sys

        for name in [n for n in sys.modules if n.split(".")[0] == "FastSAM3DSlicerQt"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

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
        self.setParameterNode(None)  # the node is reset; EndCloseEvent or enter() binds again
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

    # -- the timer, the controls, the status line ------------------------------------------

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        if text:
            slicer.util.showStatusMessage(text, 5000)

    def onPoll(self) -> None:
        """The timer's tick: a thin call into the Lib, which waits for results GIL-free."""
        from FastSAM3DSlicerLib.waiting import PROGRESS_EVERY_S

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
            if self._dropWhenIdle and self.logic is not None and not self.logic.busy:
                self._dropEngine()  # asked for while it predicted (a scene loaded, a server)
            if self.modelSetup.state == "idle" and (self.logic is None or not self.logic.busy):
                self.pollTimer.stop()
            self._updateButtons()
        finally:
            self._polling = False

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
