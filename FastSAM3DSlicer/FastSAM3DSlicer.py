"""FastSAM3D interactive 3D segmentation for 3D Slicer: the module, a thin Widget and the self-test.

Everything that does not need Qt lives in FastSAM3DSlicerLib (tested with slicer-core in plain
pytest). Nothing heavy happens at import time: the Lib, numpy, torch and fastsam3d are imported
inside methods, at first use.
"""

from __future__ import annotations

import logging
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


PROMPTS_ATTRIBUTE = "FastSAM3DSlicer.Prompts"
BOX_ATTRIBUTE = "FastSAM3DSlicer.Box"
POSITIVE_COLOR = (0.15, 0.85, 0.25)
NEGATIVE_COLOR = (0.95, 0.2, 0.2)
OUTLINE_COLOR = (1.0, 0.85, 0.1)
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


class SlicerInstallHost:
    """FastSAM3DSlicerLib.install's view of Slicer (its InstallHost): dialogs, the extensions
    manager, Slicer's pip helpers, the event pump. The install flow itself is in the Lib."""

    def __init__(self) -> None:
        self.testing = slicer.app.testingEnabled()
        self.slicer_version = f"{slicer.app.majorVersion}.{slicer.app.minorVersion}"
        self.store = qt.QSettings()
        self._dialog = None

    def confirm(self, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("FastSAM3D setup"))

    def ask_restart(self, text: str) -> bool:
        return slicer.util.confirmYesNoDisplay(text, windowTitle=_("FastSAM3D setup"))

    def restart(self) -> None:
        slicer.util.restart()

    def error(self, text: str) -> None:
        logging.error(text)
        slicer.util.errorDisplay(text, windowTitle=_("FastSAM3D setup"))

    def info(self, text: str) -> None:
        slicer.util.infoDisplay(text, windowTitle=_("FastSAM3D setup"))

    def pytorch_utils(self) -> Any:
        try:
            import PyTorchUtils
        except ImportError:  # the PyTorch extension is missing, or installed but not loaded
            return None
        return PyTorchUtils

    def _manager(self) -> Any:
        return (
            slicer.app.extensionsManagerModel()
            if hasattr(slicer.app, "extensionsManagerModel")
            else None
        )

    def extension_installed(self, name: str) -> Any:
        manager = self._manager()
        if manager is None or not hasattr(manager, "isExtensionInstalled"):
            return None
        return bool(manager.isExtensionInstalled(name))

    def install_extension(self, name: str) -> bool:
        manager = self._manager()
        if manager is None or not hasattr(manager, "installExtensionFromServer"):
            return False
        return bool(manager.installExtensionFromServer(name, False))  # we ask for the restart

    def pip_install(self, requirements: list) -> None:
        from FastSAM3DSlicerLib import install

        with slicer.util.WaitCursor():
            install.pip_installer(slicer.util.pip_install)(requirements)

    def progress(self, text: str) -> bool:
        if self._dialog is None:
            self._dialog = slicer.util.createProgressDialog(
                maximum=0, windowTitle=_("FastSAM3D setup"), labelText=text
            )
        self._dialog.labelText = text
        return bool(self._dialog.wasCanceled)

    def pump(self) -> None:
        slicer.app.processEvents()

    def done_waiting(self) -> None:
        if self._dialog is not None:
            self._dialog.close()
            self._dialog = None


class _SliceViewFilter(qt.QObject):
    """Hands one slice view's mouse events to the Widget (prompt capture and cursor)."""

    def __init__(self, onEvent: Callable[[Any, Any, Any], bool], sliceWidget: Any) -> None:
        qt.QObject.__init__(self)
        self.onEvent = onEvent
        self.sliceWidget = sliceWidget

    def eventFilter(self, obj: Any, event: Any) -> bool:
        try:
            return bool(self.onEvent(self.sliceWidget, obj, event))
        except Exception:  # noqa: BLE001 - an exception must not escape into Qt's event loop
            logging.exception("FastSAM3D: handling a view event failed")
            return False


def _sliceWidgets() -> list:
    """The slice views of the current layout."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return []
    widgets = (layoutManager.sliceWidget(name) for name in layoutManager.sliceViewNames())
    return [w for w in widgets if w is not None]


class _SliceViews:
    """The slice views' side of prompting: event filters, the polarity cursor, the box outline.

    Qt/VTK plumbing only; what an event means is the Widget's ``onViewEvent`` (and the Lib's
    PromptCapture behind it).
    """

    def __init__(self, onEvent: Callable[[Any, Any, Any], bool]) -> None:
        self.onEvent = onEvent
        self.filters = []  # (widget, _SliceViewFilter) while the module is shown
        self.outline = None  # live box outline: (view, renderer, actor, points)
        self.cursors = {}

    def install(self) -> None:
        """Watch every slice view's mouse (the view widget and the VTK widgets inside it)."""
        for sliceWidget in _sliceWidgets():
            view = sliceWidget.sliceView()
            for target in [view] + list(view.findChildren(qt.QWidget)):
                if any(target is t for t, _f in self.filters):
                    continue
                eventFilter = _SliceViewFilter(self.onEvent, sliceWidget)
                target.installEventFilter(eventFilter)
                self.filters.append((target, eventFilter))

    def remove(self) -> None:
        for target, eventFilter in self.filters:
            try:
                target.removeEventFilter(eventFilter)
                target.unsetCursor()
            except (RuntimeError, ValueError, AttributeError):
                pass  # the view was deleted with its layout
        self.filters = []

    def setCursor(self, positive: Any) -> None:
        """The polarity cursor on every watched view, or (None) the views' own back."""
        for target, _f in self.filters:
            try:
                if positive is None:
                    target.unsetCursor()
                else:
                    target.setCursor(self.cursor(positive))
            except (RuntimeError, ValueError, AttributeError):
                pass

    def cursor(self, positive: bool) -> Any:
        """A crosshair in the polarity's colour with a +/- sign: what the next click adds."""
        if positive not in self.cursors:
            size, c = 32, 15
            pixmap = qt.QPixmap(size, size)
            pixmap.fill(qt.QColor(0, 0, 0, 0))
            painter = qt.QPainter(pixmap)
            color = qt.QColor.fromRgbF(*(POSITIVE_COLOR if positive else NEGATIVE_COLOR))
            pen = qt.QPen(color)
            pen.setWidth(2)
            painter.setPen(pen)
            for x0, y0, x1, y1 in (
                (c, 0, c, c - 4),
                (c, c + 4, c, 22),
                (0, c, c - 4, c),
                (c + 4, c, 22, c),
            ):
                painter.drawLine(x0, y0, x1, y1)
            painter.drawLine(22, 27, 31, 27)  # the sign, bottom right
            if positive:
                painter.drawLine(26, 23, 26, 31)
            painter.end()
            self.cursors[positive] = qt.QCursor(pixmap, c, c)
        return self.cursors[positive]

    def showOutline(self, view: Any, rect: tuple) -> None:
        """The box being dragged, drawn in the view's display pixels until the release."""
        if self.outline is not None and self.outline[0] is not view:
            self.hideOutline()
        if self.outline is None:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(5)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5)
            for n in range(5):
                lines.InsertCellPoint(n)
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(*OUTLINE_COLOR)
            actor.GetProperty().SetLineWidth(2)
            renderer = view.renderWindow().GetRenderers().GetFirstRenderer()
            renderer.AddActor2D(actor)
            self.outline = (view, renderer, actor, points)
        (x0, y0), (x1, y1) = rect
        points = self.outline[3]
        for n, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))):
            points.SetPoint(n, x, y, 0.0)
        points.Modified()
        view.scheduleRender()

    def hideOutline(self) -> None:
        if self.outline is None:
            return
        view, renderer, actor, _points = self.outline
        self.outline = None
        renderer.RemoveActor2D(actor)
        view.scheduleRender()


class FastSAM3DSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # InteractiveLogic once a network is loaded
        self.worker = None
        self.engineFuture = None
        self.download = None
        self.capture = None  # interaction.PromptCapture: click/drag decisions and polarity
        self.preferences = None  # params.Preferences (QSettings)
        self.shortcuts = []
        self.views = _SliceViews(self.onViewEvent)  # filters, cursor, outline
        self.deferred = []  # prompts given before the model was loaded: (prompt, tag)
        self.promptNode = None
        self.boxNode = None
        self.editorNode = None  # the Segment Editor module's singleton parameter node
        self.maskingSegmentation = None
        self._areaChoices = []
        self._polling = False
        self._promptOnEnter = False
        self._weightChoices = []
        self._probingSize = False  # the weights size request is in flight (m9)
        self.backend = None  # backends.BackendSettings: local / ONNX / remote (QSettings)

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        from FastSAM3DSlicerLib import interaction, params
        from FastSAM3DSlicerLib.waiting import POLL_INTERVAL_MS

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FastSAM3DSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.capture = interaction.PromptCapture()
        self.preferences = params.Preferences.load(qt.QSettings())
        self.capture.positive = self.preferences.positive
        self._setupBackend()

        editor = self.ui.segmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        # Masking has its own, always visible section below (the editor's appears only while
        # one of its effects is active); both edit the same Segment Editor parameter node.
        if hasattr(editor, "setMaskingSectionVisible"):
            editor.setMaskingSectionVisible(False)
        for label, _mode in params.OVERWRITE_MODES:
            self.ui.overwriteModeComboBox.addItem(label)
        self._selectEditorNode()
        for name in params.DEVICES:
            self.ui.deviceComboBox.addItem(name)
        self.ui.deviceComboBox.setCurrentIndex(params.DEVICES.index(self.preferences.device))
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
        self.ui.cancelDownloadButton.clicked.connect(self.onCancelDownload)
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
        self.ui.editableAreaComboBox.connect("activated(int)", self.onEditableAreaChosen)
        self.ui.overwriteModeComboBox.connect("activated(int)", self.onOverwriteChosen)
        self.ui.intensityMaskCheckBox.toggled.connect(self.onIntensityMaskChanged)
        self.ui.intensityRangeWidget.connect(
            "valuesChanged(double,double)", self.onIntensityMaskChanged
        )
        editor.connect("currentSegmentIDChanged(QString)", self.onSegmentChanged)

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

    def _selectEditorNode(self) -> None:
        """Use the Segment Editor module's parameter node: masking is shared with it."""
        from FastSAM3DSlicerLib import params

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

    def enter(self) -> None:
        """Called each time the user opens this module: keys and view capture start here."""
        self._selectEditorNode()
        self.ui.segmentEditorWidget.updateWidgetFromMRML()
        self._installShortcuts()
        self._installViewFilters()
        from FastSAM3DSlicerLib import install

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
        self.deferred = []
        if self.engineFuture is not None:
            self.engineFuture = None
            qt.QApplication.restoreOverrideCursor()  # set while the model was loading
        if self.download is not None:
            self.download.cancel()
        if self.logic is not None:
            self._closeEngine(self.logic.engine)
            self.logic.close()
        elif self.worker is not None:
            self.worker.shutdown()

    def onSceneClose(self, caller: Any = None, event: Any = None) -> None:
        """The scene closes: its nodes, prompts and sessions go; the network stays loaded."""
        if self.capture is not None:
            self.capture.cancel()
        self._hideOutline()
        self.deferred = []  # their markers go with the scene
        if self.logic is not None:
            # Even while predicting: results of the closed scene come back as stale and are
            # dropped, never written into a new scene's nodes that reuse the old IDs (M8).
            self.logic.forget_sessions()
        self.promptNode = None
        self.boxNode = None
        editor = self.ui.segmentEditorWidget  # as the Segment Editor module does
        editor.setSegmentationNode(None)
        editor.removeViewObservations()
        self._observeMaskingSegmentation(None)
        if self.editorNode is not None:
            self.removeObserver(
                self.editorNode, vtk.vtkCommand.ModifiedEvent, self.onEditorNodeModified
            )
            self.editorNode = None

    def onSceneClosed(self, caller: Any = None, event: Any = None) -> None:
        if self.parent.isEntered:
            self._selectEditorNode()

    # -- masking: the Segment Editor's parameter node ---------------------------------------

    def onEditorNodeModified(self, caller: Any = None, event: Any = None) -> None:
        node = self.editorNode
        if node is None:
            return
        if node.GetActiveEffectName() and self.capture is not None and self.capture.active:
            # An editor effect (Paint, Draw...) takes left clicks in the views from now on.
            self._setPrompting(
                False,
                message=_(
                    "Prompting paused while a Segment Editor effect is active; press A or X to "
                    "prompt again."
                ),
            )
        self._observeMaskingSegmentation(node.GetSegmentationNode())
        self._updateMaskingWidgets()

    def _observeMaskingSegmentation(self, segmentation: Any) -> None:
        """Keep the "Inside <segment>" choices in step with the segments (added, renamed)."""
        if segmentation is self.maskingSegmentation:
            return
        events = (
            slicer.vtkSegmentation.SegmentAdded,
            slicer.vtkSegmentation.SegmentRemoved,
            slicer.vtkSegmentation.SegmentModified,
        )
        if self.maskingSegmentation is not None:
            for e in events:
                self.removeObserver(self.maskingSegmentation, e, self._onSegmentsChanged)
        self.maskingSegmentation = segmentation
        if segmentation is not None:
            for e in events:
                self.addObserver(segmentation, e, self._onSegmentsChanged)

    def _onSegmentsChanged(self, caller: Any = None, event: Any = None) -> None:
        self._updateMaskingWidgets()

    def _updateMaskingWidgets(self) -> None:
        from FastSAM3DSlicerLib import params

        node = self.editorNode
        if node is None:
            return
        self._areaChoices = params.editable_area_choices(node.GetSegmentationNode())
        area = self.ui.editableAreaComboBox
        area.blockSignals(True)
        area.clear()
        for choice in self._areaChoices:
            area.addItem(choice.label)
        area.setCurrentIndex(params.current_area_index(self._areaChoices, node))
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
        from FastSAM3DSlicerLib import params

        if self.editorNode is not None and 0 <= index < len(self._areaChoices):
            params.set_editable_area(self.editorNode, self._areaChoices[index])

    def onOverwriteChosen(self, index: int) -> None:
        from FastSAM3DSlicerLib import params

        if self.editorNode is not None and index >= 0:
            params.set_overwrite_index(self.editorNode, index)

    def onIntensityMaskChanged(self, *args: Any) -> None:
        from FastSAM3DSlicerLib import params

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
            self._status(str(e))

    # -- shortcuts ------------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        if self.shortcuts:
            return
        # Application-wide (clicks happen in the views, not in this panel), but only while the
        # module is shown: created in enter(), deleted in exit(). Text fields keep their keys.
        for key, method in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", self._guarded(getattr(self, method)))
            self.shortcuts.append(shortcut)

    def _guarded(self, action: Callable[[], Any]) -> Callable[..., None]:
        """A slot that shows an unexpected error in Slicer's error display, not only the log."""

        def run(*args: Any) -> None:
            with slicer.util.tryWithErrorDisplay(
                _("FastSAM3D: this action failed."), waitCursor=False
            ):
                action()

        return run

    def _removeShortcuts(self) -> None:
        for shortcut in self.shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []

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
        """A remote engine ends its sessions on the server (frees the volumes there at once,
        not after the server's idle timeout). Network calls: on a daemon thread, so neither
        the panel nor quitting Slicer waits for a slow server."""
        close = getattr(eng, "close", None)
        if close is None:
            return

        def run() -> None:
            try:
                close()
            except Exception:  # noqa: BLE001 - the server is gone: nothing left to free
                logging.warning("FastSAM3D: could not close the remote sessions")

        import threading

        self._closingThread = threading.Thread(target=run, name="FastSAM3D-close", daemon=True)
        self._closingThread.start()

    # -- dependencies ---------------------------------------------------------------------

    def _refreshDependencies(self) -> bool:
        from FastSAM3DSlicerLib import deps, engine, install

        problem = install.version_problem(f"{slicer.app.majorVersion}.{slicer.app.minorVersion}")
        if problem:  # a Slicer too old to run the module: say so, offer nothing
            self.ui.dependenciesStatusLabel.text = problem
            self.ui.installDependenciesButton.setVisible(False)
            self.ui.loadModelButton.enabled = False
            return False
        missing = self._backendMissing()
        if missing:
            text = _("missing: ") + ", ".join(r.text for r in missing)
            self.ui.installDependenciesButton.setVisible(True)
        else:
            text = _("installed")
            self.ui.installDependenciesButton.setVisible(False)
            if self._backendKind() != "remote":  # a server has its own model
                self._refreshWeights()
        shadowed = None
        if self._backendKind() == "local":
            try:  # m13: our own fastsam3d first; a foreign one imported earlier is named
                shadowed = engine.ensure_fastsam3d_importable()
            except ImportError as e:
                shadowed = str(e)
            if shadowed:
                logging.warning("FastSAM3D: %s", shadowed)
        # Slicer 5.8: only .safetensors checkpoints load (PyTorch's floor; not the other backends)
        note = deps.python39_note() if self._backendKind() == "local" else None
        notes = [n for n in (note, shadowed) if n]
        self.ui.dependenciesStatusLabel.text = "\n".join([text, *notes])
        self._updateButtons()
        return not missing

    def onInstallDependencies(self, resuming: bool = False) -> bool:
        """The first-use install (FastSAM3DSlicerLib.install): one dialog; torch through the
        PyTorch extension in a background process, the UI live; a restart asked for, never
        silent; the rest through Slicer's pip helpers."""
        from FastSAM3DSlicerLib import install

        outcome = install.install_dependencies(
            SlicerInstallHost(), resuming=bool(resuming), missing=self._backendMissing
        )
        ok = self._refreshDependencies()
        return outcome == install.DONE and ok

    # -- weights --------------------------------------------------------------------------

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
        if self.preferences is not None and self.preferences.weights in keys:
            self.ui.weightsComboBox.setCurrentIndex(keys.index(self.preferences.weights))
        self.ui.weightsComboBox.blockSignals(False)
        self._showWeightsStatus()

    def _selectedWeights(self):
        index = self.ui.weightsComboBox.currentIndex
        return self._weightChoices[index] if 0 <= index < len(self._weightChoices) else None

    def onWeightsChanged(self, index: Any = None) -> None:
        """Another network was chosen: the loaded one and its sessions no longer apply."""
        self._showWeightsStatus()
        self._savePreferences()
        self._dropEngine()

    def onDeviceChanged(self, index: Any = None) -> None:
        self._savePreferences()
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
            choice.description if local else (weights.status_text(choice.key))
        )
        self._updateButtons()

    def onDownloadWeights(self) -> None:
        from FastSAM3DSlicerLib import waiting, weights

        choice = self._selectedWeights()
        if choice is None or self.download is not None or self._probingSize:
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
        from FastSAM3DSlicerLib import waiting, weights

        task = self.download
        # A GIL-free wait with the UI pumped: the download thread reads at full speed (one
        # wait per tick measured 2.1x slower than free for model loading, this 1.3x).
        waiting.wait_pumping(task, slicer.app.processEvents, timeout=PROGRESS_EVERY_S)
        if task.total:
            self.ui.downloadProgressBar.setValue(int(100 * task.done / task.total))
            self.ui.downloadProgressBar.setFormat(f"%p% of {weights.human_size(task.total)}")
        if not task.finished:
            return
        self.download = None
        self.ui.downloadProgressBar.setVisible(False)
        self.ui.cancelDownloadButton.setVisible(False)
        if task.error is not None:
            self._dropDeferred("")
            slicer.util.errorDisplay(_("Download failed: ") + str(task.error))
        elif task.cancelled:
            self._dropDeferred("")
            self.ui.statusLabel.text = _("Download cancelled; nothing was kept.")
        elif self.deferred:
            self.onLoadModel()  # prompts are waiting for this model
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
        if self.promptNode is not None and self.promptNode.GetScene() is not None:
            self.promptNode.RemoveAllControlPoints()  # their sessions (and undo) are gone
        if self.logic is not None and not keepEngine:
            self._closeEngine(self.logic.engine)
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
        kind = self._backendKind()
        choice = self._selectedWeights()
        if choice is None and kind != "remote":
            return
        localPath = self.ui.localWeightsPathLineEdit.currentPath
        if (
            kind != "remote"
            and choice.key != engine.LOCAL_FILE
            and not weights.is_downloaded(choice.key)
        ):
            self.onDownloadWeights()
            self.ui.statusLabel.text = _("Load the model again once the download has finished.")
            return
        if self.logic is not None:
            self._dropEngine()  # sessions of the old network end here, with their markers
        if self.worker is None:
            self.worker = InferenceWorker()
        device = self.ui.deviceComboBox.currentText
        # Loaded on the inference thread: the network's first CUDA work (and cuDNN's per-thread
        # caches) must happen where every later click runs.
        if kind == "local":
            self.engineFuture = self.worker.submit(
                engine.FastSAM3DEngine.load, choice.key, device, localPath or None
            )
        else:  # remote (connection test first) or ONNX Runtime: FastSAM3DSlicerLib.backends
            from FastSAM3DSlicerLib import backends

            self.engineFuture = self.worker.submit(
                backends.build_engine,
                self.backend,
                choice.key if choice is not None else "",
                device,
                localPath or None,
            )
        self.ui.deviceLabel.text = _("loading...")
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        self.pollTimer.start()
        self._updateButtons()

    def _pollEngine(self) -> None:
        from FastSAM3DSlicerLib.logic import InteractiveLogic
        from FastSAM3DSlicerLib.waiting import wait_pumping

        future = self.engineFuture
        # GIL-free waits with the UI pumped in between: the worker loads at nearly full speed
        # (1.3x free vs 2.1x with one short wait per tick, bench_gil_latency.py --loads).
        if not wait_pumping(future, slicer.app.processEvents, timeout=PROGRESS_EVERY_S):
            return
        if self.engineFuture is not future:
            return  # the scene or the module was closed from inside the pump
        self.engineFuture = None
        qt.QApplication.restoreOverrideCursor()
        try:
            eng = future.result()
        except Exception as e:
            logging.exception("FastSAM3D model loading failed")
            self.ui.deviceLabel.text = _("model not loaded")
            self._dropDeferred("")
            slicer.util.errorDisplay(_("Loading the model failed: ") + str(e))
            self._updateButtons()
            return
        if self.logic is None:
            self.logic = InteractiveLogic(eng, self.worker)
        elif not self.logic.set_engine(eng):  # m1: predictions in flight finish first
            self._status(_("The new model is used once the running predictions are written."))
        self.ui.deviceLabel.text = f"{eng.device_info.description} [{eng.device}]"
        self.ui.cpuWarningLabel.setVisible(eng.device_info.is_cpu)
        self._updateButtons()
        self._runDeferred()

    # -- prompts: capture in the slice views ----------------------------------------------

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

    def _hideOutline(self) -> None:
        self.views.hideOutline()

    def onViewEvent(self, sliceWidget: Any, obj: Any, event: Any) -> bool:
        """A slice view's mouse event; True swallows it (only the left button, only prompting).

        Right-drag zoom, middle-drag pan, the wheel and modified clicks stay Slicer's.
        """
        capture = self.capture
        kind = event.type()
        if not capture.active:
            return False
        if kind in (qt.QEvent.Enter, qt.QEvent.MouseMove):
            obj.setCursor(self.views.cursor(capture.positive))  # Slicer resets it on hover
        if kind not in (
            qt.QEvent.MouseButtonPress,
            qt.QEvent.MouseMove,
            qt.QEvent.MouseButtonRelease,
            qt.QEvent.MouseButtonDblClick,
        ):
            return False  # paint, wheel, keys...: the view's own
        left = qt.Qt.LeftButton
        view = sliceWidget.sliceView()
        key = sliceWidget.mrmlSliceNode().GetID()
        if kind == qt.QEvent.MouseButtonPress:
            modifiers = (
                qt.Qt.ShiftModifier | qt.Qt.ControlModifier | qt.Qt.AltModifier | qt.Qt.MetaModifier
            )
            if event.button() != left or (event.modifiers() & modifiers):
                return False  # Shift/Ctrl-clicks keep Slicer's meaning (crosshair...)
            xy, ratio = self._displayXY(view, obj, event)
            return capture.press(key, xy, ratio)
        if kind == qt.QEvent.MouseMove:
            if not capture.pressing:
                return False
            rect = capture.move(key, self._displayXY(view, obj, event)[0])
            if rect is not None:
                self.views.showOutline(view, rect)
            return True
        if kind == qt.QEvent.MouseButtonRelease and event.button() == left:
            if not capture.pressing:
                return False
            prompt = None
            try:
                prompt = capture.release(
                    key, self._displayXY(view, obj, event)[0], sliceWidget.mrmlSliceNode()
                )
            except ValueError as e:  # a box with no area
                self._status(str(e))
            self._hideOutline()
            if prompt is not None:
                composite = sliceWidget.mrmlSliceCompositeNode()
                viewVolumeID = composite.GetBackgroundVolumeID() if composite else None
                # Out of the event handler first: what follows may load a model or ask.
                qt.QTimer.singleShot(0, lambda: self._onPrompt(prompt, viewVolumeID))
            return True
        return kind == qt.QEvent.MouseButtonDblClick and event.button() == left

    def _displayXY(self, view: Any, obj: Any, event: Any) -> tuple:
        from FastSAM3DSlicerLib import interaction

        pos = event.pos()
        if obj is not view:
            pos = obj.mapTo(view, pos)
        ratio = view.devicePixelRatioF() if hasattr(view, "devicePixelRatioF") else 1.0
        return interaction.display_xy(pos.x(), pos.y(), view.height, ratio), ratio

    # -- prompts: polarity and prompting state ------------------------------------------

    def _setPrompting(self, active: bool, positive: Any = None, message: str = "") -> None:
        """Start or stop taking the views' left clicks as prompts."""
        if active:
            # An editor effect or a markups placement would get the same clicks.
            self.ui.segmentEditorWidget.setActiveEffect(None)
            interactionNode = slicer.app.applicationLogic().GetInteractionNode()
            interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)
            self.capture.start(positive)
            self._savePreferences()
        else:
            self.capture.stop()
            self._hideOutline()
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
        self._savePreferences()
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

    def _savePreferences(self) -> None:
        from FastSAM3DSlicerLib import params

        choice = self._selectedWeights()
        device = self.ui.deviceComboBox.currentText
        self.preferences = params.Preferences(
            choice.key if choice is not None else self.preferences.weights,
            device if device in params.DEVICES else self.preferences.device,
            self.capture.positive,
        )
        self.preferences.save(qt.QSettings())

    # -- prompts: target, markers, submission -------------------------------------------

    def _sourceVolume(self) -> Any:
        editor = self.ui.segmentEditorWidget
        return (
            editor.sourceVolumeNode()
            if hasattr(editor, "sourceVolumeNode")
            else editor.masterVolumeNode()
        )

    def _firstViewVolumeID(self) -> Any:
        for sliceWidget in _sliceWidgets():
            composite = sliceWidget.mrmlSliceCompositeNode()
            if composite is not None and composite.GetBackgroundVolumeID():
                return composite.GetBackgroundVolumeID()
        return None

    def _ensureTarget(self, segmentID: Any, viewVolumeID: Any) -> Any:
        """The target of the next prompt, creating a segmentation/segment if none is chosen."""
        from FastSAM3DSlicerLib import interaction

        editor = self.ui.segmentEditorWidget
        volume = self._sourceVolume()
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
            tag = self._addMarker(prompt)
            if self.logic is not None:
                self._submitPrompt(prompt, tag)
                return
            # No model yet: keep the prompt (its marker, its target) and start loading; it
            # runs once the model is ready, on the segment it was given for.
            self.deferred.append((prompt, tag, target))
            if self.engineFuture is None:
                self.onLoadModel()
            if self.engineFuture is None and self.download is None:
                self._dropDeferred(_("The model is not loaded; the prompt was removed."))
            else:
                self._status(_("Loading the model; your prompt runs as soon as it is ready."))

    def _dropDeferred(self, message: str) -> None:
        for _prompt, tag, _target in self.deferred:
            self._removeMarker(tag)
        self.deferred = []
        if message:
            self._status(message)

    def _runDeferred(self) -> None:
        deferred, self.deferred = self.deferred, []
        for prompt, tag, target in deferred:
            self._submitPrompt(prompt, tag, target)

    def _addMarker(self, prompt: Any) -> Any:
        from FastSAM3DSlicerLib import interaction

        if isinstance(prompt, interaction.BoxPrompt):
            node = self._ensureBoxNode()
            interaction.set_roi_from_box(node, prompt.box)
            return "box"
        node = self._ensurePromptNode()
        n = node.AddControlPointWorld(vtk.vtkVector3d(*prompt.world))
        node.SetNthControlPointSelected(n, prompt.positive)  # selected = positive = green
        node.SetNthControlPointLocked(n, True)
        return node.GetNthControlPointID(n)

    def _submitPrompt(self, prompt: Any, tag: Any, target: Any = None) -> None:
        from FastSAM3DSlicerLib import interaction

        if isinstance(prompt, interaction.BoxPrompt):
            corners = prompt.box.corners()
            self._submit(lambda: self.logic.add_box(corners, tag=tag), tag, target)
        else:
            self._submit(
                lambda: self.logic.add_point(prompt.world, prompt.positive, tag=tag), tag, target
            )

    def _ensurePromptNode(self) -> Any:
        node = self.promptNode
        if node is None or node.GetScene() is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", "FastSAM3D prompts"
            )
            node.SetAttribute(PROMPTS_ATTRIBUTE, "1")
            node.SetControlPointLabelFormat("")
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*POSITIVE_COLOR)  # selected flag = positive point
            display.SetColor(*NEGATIVE_COLOR)
            display.SetPointLabelsVisibility(False)
            node.SetSaveWithScene(False)
            self.promptNode = node
        return node

    def _ensureBoxNode(self) -> Any:
        node = self.boxNode
        if node is None or node.GetScene() is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "FastSAM3D box")
            node.SetAttribute(BOX_ATTRIBUTE, "1")
            node.CreateDefaultDisplayNodes()
            node.SetSaveWithScene(False)
            self.boxNode = node
        return node

    def onApplyBox(self) -> None:
        """Segment again with the box as it is now (after moving its handles)."""
        from FastSAM3DSlicerLib import mrml

        node = self.boxNode
        if node is None or node.GetScene() is None or node.GetNumberOfDefinedControlPoints() == 0:
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

    def _setLogicTarget(self, target: Any = None) -> bool:
        """Point the Lib at ``target`` (an interaction.Target) or the editor's selection."""
        if target is not None:
            self.logic.set_target(
                target.volume, target.segmentation, target.segment_id, self.editorNode
            )
            return True
        editor = self.ui.segmentEditorWidget
        self.logic.set_target(
            self._sourceVolume(),
            editor.segmentationNode(),
            editor.currentSegmentID(),
            self.editorNode,
        )
        return True

    def _submit(self, call: Callable[[], Any], tag: Any, target: Any = None) -> None:
        """Queue a prompt on the Lib; refusals (outside the volume...) become a status line."""
        from FastSAM3DSlicerLib import logic

        self._setLogicTarget(target)
        try:
            call()
        except (ValueError, KeyError, logic.NoTargetError, RuntimeError) as e:
            if not isinstance(e, (ValueError, logic.NoTargetError)):
                logging.warning("FastSAM3D refused a prompt: %s", e)
            self._removeMarker(tag)
            self._status(str(e))
            return
        self._status(_("Predicting..."))
        self.pollTimer.start()
        self._updateButtons()
        self.onPoll()  # a fast result is written before this returns

    def _removeMarker(self, tag: Any) -> None:
        """Take a prompt's marker away (undone, refused or failed); a box hides the ROI."""
        if tag == "box":
            if self.boxNode is not None and self.boxNode.GetScene() is not None:
                self.boxNode.RemoveAllControlPoints()
            return
        node = self.promptNode
        if node is None or tag is None or node.GetScene() is None:
            return
        index = node.GetNthControlPointIndexByID(tag)
        if index >= 0:
            node.RemoveNthControlPoint(index)

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        if text:
            slicer.util.showStatusMessage(text, 5000)

    # -- results --------------------------------------------------------------------------

    def onPoll(self) -> None:
        """The timer's tick: a thin call into the Lib, which waits for results GIL-free."""
        if self._polling:
            return  # the Lib's pumped wait below runs the event loop, and so this timer
        self._polling = True
        try:
            if self.download is not None:
                self._pollDownload()
            if self.engineFuture is not None:
                self._pollEngine()
            if self.logic is not None and self.logic.busy:
                self._showResults(
                    self.logic.poll(pump=slicer.app.processEvents, max_s=PROGRESS_EVERY_S)
                )
            idle = (
                self.download is None
                and self.engineFuture is None
                and (self.logic is None or not self.logic.busy)
            )
            if idle:
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
                self._removeMarker(item.prompt.tag)
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
        return self._setLogicTarget()

    def onUndo(self) -> None:
        if not self._readyForEdits():
            return
        with slicer.util.WaitCursor():
            prompt = self.logic.undo()
        if prompt is None:
            self._status(_("Nothing to undo for this segment."))
        else:
            self._removeMarker(prompt.tag)
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
                self._removeMarker(prompt.tag)
        if self.boxNode is not None and self.boxNode.GetScene() is not None:
            self.boxNode.RemoveAllControlPoints()
        self._status(_("Segment reset: {n} prompts undone.").format(n=steps))
        self._updateButtons()

    def onClear(self) -> None:
        """Forget this segment's prompts; the segment keeps what it holds now."""
        if not self._readyForEdits():
            return
        for prompt in self.logic.clear():
            self._removeMarker(prompt.tag)
        if self.boxNode is not None and self.boxNode.GetScene() is not None:
            self.boxNode.RemoveAllControlPoints()
        self._updateButtons()

    def onNewSegment(self) -> None:
        from FastSAM3DSlicerLib import interaction

        try:
            self._ensureTarget("", self._firstViewVolumeID())
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
        if self.promptNode is None or self.promptNode.GetScene() is None:
            return
        self.promptNode.RemoveAllControlPoints()
        if self.logic is None:
            return
        self._setLogicTarget()
        for prompt in self.logic.prompts():
            if prompt.kind != "point":
                continue
            n = self.promptNode.AddControlPointWorld(vtk.vtkVector3d(*prompt.world))
            self.promptNode.SetNthControlPointSelected(n, prompt.positive)
            self.promptNode.SetNthControlPointLocked(n, True)
            prompt.tag = self.promptNode.GetNthControlPointID(n)

    def _updateButtons(self) -> None:
        """m1: nothing that replaces the network is possible while it predicts or loads."""
        busy = self.logic is not None and self.logic.busy
        loading = self.engineFuture is not None
        downloading = self.download is not None
        self.ui.downloadWeightsButton.enabled = bool(self._weightChoices) and not downloading
        self.ui.removeWeightsButton.enabled = (
            bool(self._weightChoices) and not downloading and not busy and not loading
        )
        self.ui.loadModelButton.enabled = not (loading or downloading or busy)
        self.ui.weightsComboBox.enabled = not (loading or downloading or busy)
        self.ui.deviceComboBox.enabled = not (loading or busy)
        self.ui.backendComboBox.enabled = not (loading or busy)
        for button in (self.ui.undoButton, self.ui.resetSegmentButton, self.ui.clearButton):
            button.enabled = self.logic is not None and not busy


class FastSAM3DSlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer's module-logic slot; the real logic is FastSAM3DSlicerLib.logic.InteractiveLogic."""

    def createInteractiveLogic(
        self, weights: str = "fastsam3d", device: str = "auto", localPath: str | None = None
    ) -> Any:
        from FastSAM3DSlicerLib.engine import FastSAM3DEngine
        from FastSAM3DSlicerLib.logic import InteractiveLogic
        from FastSAM3DSlicerLib.worker import InferenceWorker

        worker = InferenceWorker()
        engine = worker.call(FastSAM3DEngine.load, weights, device, localPath)
        return InteractiveLogic(engine, worker)


class FastSAM3DSlicerTest(ScriptedLoadableModuleTest):
    """Point, box and undo through the Widget on a phantom volume, each checked against the
    engine's own result; skips without torch; offline (fixture weights when no real ones).
    The body is FastSAM3DSlicerLib/selftest.py."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        from FastSAM3DSlicerLib import selftest

        selftest.run_in_reload_and_test(self)

    def test_prompts_through_the_widget(self) -> None:
        from FastSAM3DSlicerLib import selftest

        selftest.run_widget_prompt_test(self)
