"""The Widget's wiring, run on real MRML (slicer-core) with stand-ins for Qt and the Slicer app.

FastSAM3DSlicer.py needs Qt and the Slicer application, which CI does not have. Here ``qt`` is a
small stand-in (events, timers, settings; drawing calls are no-ops) and ``slicer.app`` a stub,
while scene, slice nodes, markups, segmentations and the Lib are real. So these tests run the
Widget's own methods: which view events it takes, what a click or a drag becomes, that a
prompt before the model is loaded is kept, that busy prompts are refused, and that leaving the
module leaves nothing acting on the views. Pixels, cursors and real Qt event delivery remain
for a real Slicer (docs/slicer.md).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from slicer_scene import REPO, slicer

from FastSAM3DSlicerLib import interaction, params
from FastSAM3DSlicerLib.logic import InteractiveLogic


class Anything:
    """Accepts any call or attribute (drawing, cursors, layouts the tests do not look at)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return Anything()

    def __getattr__(self, name):
        return Anything()

    def __or__(self, other):
        return self

    def __bool__(self) -> bool:
        return False


class FakeTimer:
    pending: list = []  # singleShot callbacks, run by the test as the event loop would

    def __init__(self, *args) -> None:
        self.active = False
        self.timeout = types.SimpleNamespace(connect=lambda f: None)

    @staticmethod
    def singleShot(msec, callback) -> None:  # noqa: N802 - Qt's name
        FakeTimer.pending.append(callback)

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def setInterval(self, msec) -> None:  # noqa: N802 - Qt's name
        pass


class FakeSettings:
    data: dict = {}

    def value(self, key, default=None):
        return self.data.get(key, default)

    def setValue(self, key, value) -> None:  # noqa: N802 - Qt's name
        self.data[key] = str(value)

    def remove(self, key) -> None:
        self.data.pop(key, None)


def fake_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QObject = type("QObject", (), {"__init__": lambda self, *a: None})
    qt.QWidget = Anything
    qt.QEvent = types.SimpleNamespace(
        Enter=10,
        MouseButtonPress=2,
        MouseButtonRelease=3,
        MouseButtonDblClick=4,
        MouseMove=5,
        Wheel=31,
    )
    qt.Qt = types.SimpleNamespace(
        LeftButton=1,
        RightButton=2,
        MiddleButton=4,
        NoModifier=0,
        ShiftModifier=0x02000000,
        ControlModifier=0x04000000,
        AltModifier=0x08000000,
        MetaModifier=0x10000000,
        BusyCursor=16,
        WaitCursor=3,
    )
    qt.QTimer = FakeTimer
    qt.QSettings = FakeSettings
    for name in (
        "QPixmap",
        "QPainter",
        "QPen",
        "QCursor",
        "QColor",
        "QShortcut",
        "QKeySequence",
        "QApplication",
    ):
        setattr(qt, name, Anything())
    return qt


class Widget(Anything):
    """A Qt widget stand-in that remembers properties and checked state."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)
        self.checked = False

    def setChecked(self, on) -> None:  # noqa: N802
        self.checked = bool(on)

    def blockSignals(self, on) -> bool:  # noqa: N802
        return False

    def addItem(self, text, data=None) -> None:  # noqa: N802
        self.__dict__.setdefault("items", []).append(text)

    def clear(self) -> None:
        self.__dict__["items"] = []


class Signal:
    """A Qt signal: ``connect`` keeps the slots, ``emit`` calls them."""

    def __init__(self) -> None:
        self.slots = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def emit(self, *args) -> None:
        for slot in list(self.slots):
            slot(*args)


class ComboBox(Widget):
    """QComboBox: items with their data, the current index and ``currentIndexChanged``, which
    fires on a change unless signals are blocked (the first item added becomes current)."""

    def __init__(self, items=(), **values) -> None:
        super().__init__(**values)
        self.items, self.data, self._index, self._blocked = [], [], -1, False
        self.currentIndexChanged = Signal()
        for text, data in items:
            self.addItem(text, data)

    def addItem(self, text, data=None) -> None:  # noqa: N802
        self.items.append(text)
        self.data.append(data)
        if self._index < 0:
            self.setCurrentIndex(0)

    def findData(self, data) -> int:  # noqa: N802
        return self.data.index(data) if data in self.data else -1

    def blockSignals(self, on) -> bool:  # noqa: N802
        was, self._blocked = self._blocked, bool(on)
        return was

    def setCurrentIndex(self, index) -> None:  # noqa: N802
        if index != self._index:
            self._index = index
            if not self._blocked:
                self.currentIndexChanged.emit(index)

    @property
    def currentIndex(self) -> int:  # noqa: N802
        return self._index

    @currentIndex.setter
    def currentIndex(self, index) -> None:  # noqa: N802
        self.setCurrentIndex(index)

    @property
    def currentText(self) -> str:  # noqa: N802
        return self.items[self._index] if 0 <= self._index < len(self.items) else ""

    def choose(self, data) -> None:
        """The user picks the item holding ``data`` (the signal fires)."""
        self.setCurrentIndex(self.findData(data))


class Editor(Widget):
    """qMRMLSegmentEditorWidget's selection API on a real parameter node."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []
        self.volume = self.segmentation = None
        self.segment = ""

    def sourceVolumeNode(self):  # noqa: N802
        return self.volume

    def segmentationNode(self):  # noqa: N802
        return self.segmentation

    def currentSegmentID(self):  # noqa: N802
        return self.segment

    def setSourceVolumeNode(self, node) -> None:  # noqa: N802
        self.volume = node

    def setSegmentationNode(self, node) -> None:  # noqa: N802
        self.segmentation = node

    def setCurrentSegmentID(self, segment_id) -> None:  # noqa: N802
        self.segment = segment_id
        self.owner.onSegmentChanged(segment_id)

    def setActiveEffect(self, effect) -> None:  # noqa: N802
        self.calls.append(("setActiveEffect", effect))

    def removeViewObservations(self) -> None:  # noqa: N802
        self.calls.append(("removeViewObservations",))


class Event:
    def __init__(self, kind, button=0, buttons=0, modifiers=0, pos=(0, 0)) -> None:
        self._kind, self._button, self._buttons = kind, button, buttons
        self._modifiers, self._pos = modifiers, pos

    def type(self):
        return self._kind

    def button(self):
        return self._button

    def buttons(self):
        return self._buttons

    def modifiers(self):
        return self._modifiers

    def pos(self):
        x, y = self._pos
        return types.SimpleNamespace(x=lambda: x, y=lambda: y)


class View(Anything):
    height = 300

    def findChildren(self, cls) -> list:  # noqa: N802
        return []

    def devicePixelRatioF(self) -> float:  # noqa: N802
        return 1.0


class SliceWidget:
    def __init__(self, slice_node, background_id) -> None:
        self.view = View()
        self.node = slice_node
        self.composite = types.SimpleNamespace(GetBackgroundVolumeID=lambda: background_id)

    def sliceView(self):  # noqa: N802
        return self.view

    def mrmlSliceNode(self):  # noqa: N802
        return self.node

    def mrmlSliceCompositeNode(self):  # noqa: N802
        return self.composite


@pytest.fixture
def env(monkeypatch, scene, stub_engine):
    """The module imported against the stand-ins, a Widget on the test scene, and a view.

    The loader is the one the install and self-test tests use (module/widget_harness.py,
    built on the stand-ins above); here the Red view looks at the test volume.
    """
    sys.path.insert(0, str(REPO / "Testing" / "slicer" / "module"))
    import widget_harness

    slice_node = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetDimensions(400, 300, 1)
    slice_node.SetFieldOfView(80.0, 60.0, 1.0)  # 0.2 mm per pixel
    center = scene.world_of_ijk((22, 20, 18))
    m = slice_node.GetSliceToRAS()
    for r in range(3):
        m.SetElement(r, 3, float(center[r]))
    slice_node.UpdateMatrices()
    view = SliceWidget(slice_node, scene.volume.GetID())
    layout = types.SimpleNamespace(
        sliceViewNames=lambda: ["Red"], sliceWidget=lambda name: view if name == "Red" else None
    )
    messages = []
    loaded = widget_harness.load_widget(
        monkeypatch,
        scene.scene,
        app={"layoutManager": lambda: layout, "processEvents": lambda: None},
        util={"showStatusMessage": lambda m, d=0: messages.append(m)},
    )
    w = loaded.widget
    w.logic = InteractiveLogic(stub_engine)
    interaction_node = slicer.app.applicationLogic().GetInteractionNode()
    yield types.SimpleNamespace(
        module=loaded.module,
        widget=w,
        view=view,
        scene=scene,
        messages=messages,
        qt=loaded.qt,
        interaction_node=interaction_node,
    )
    if w.logic is not None:
        w.logic.close()


def send(env, kind, button=1, buttons=0, modifiers=0, pos=(200, 150)) -> bool:
    view = env.view
    return env.widget.onViewEvent(view, view.view, Event(kind, button, buttons, modifiers, pos))


def run_event_loop() -> None:
    while FakeTimer.pending:
        FakeTimer.pending.pop(0)()


def marker_count(env) -> int:
    node = env.widget.markers.point_node
    return 0 if node is None else node.GetNumberOfControlPoints()


QE = fake_qt().QEvent


def test_views_keep_every_event_while_not_prompting(env):
    for kind in (QE.MouseButtonPress, QE.MouseMove, QE.MouseButtonRelease):
        assert not send(env, kind)
    assert FakeTimer.pending == []


def test_only_unmodified_left_button_is_taken_zoom_pan_and_shift_stay_slicers(env):
    env.widget.onPositive()
    assert not send(env, QE.MouseButtonPress, button=2)  # right: zoom
    assert not send(env, QE.MouseButtonPress, button=4)  # middle: pan
    assert not send(env, QE.Wheel)
    assert not send(env, QE.MouseButtonPress, button=1, modifiers=0x02000000)  # Shift+click
    assert FakeTimer.pending == []


def test_click_places_a_point_marker_and_the_segment_updates(env):
    w, scene = env.widget, env.scene
    w.ui.segmentEditorWidget.volume = scene.volume
    w.ui.segmentEditorWidget.segmentation = scene.segmentation
    w.ui.segmentEditorWidget.segment = scene.target
    w.onNegative()
    w.togglePolarity()  # Q: now positive
    assert send(env, QE.MouseButtonPress, pos=(200, 150))
    assert send(env, QE.MouseButtonRelease, pos=(201, 151))  # jitter: still a click
    assert marker_count(env) == 0  # nothing happens inside the view's event handler
    run_event_loop()
    assert marker_count(env) == 1 and w.markers.point_node.GetNthControlPointSelected(0)  # positive
    w.logic.wait()
    w.onPoll()
    world = interaction.xy_to_ras(env.view.node, interaction.display_xy(200, 150, 300))
    assert scene.segment_value_at_world(scene.target, world)
    w.onUndo()
    assert marker_count(env) == 0 and not scene.segment(scene.target).any()


def test_drag_shows_an_outline_and_segments_the_box(env, monkeypatch):
    w, scene = env.widget, env.scene
    outlines = []
    monkeypatch.setattr(w.views, "showOutline", lambda view, rect: outlines.append(rect))
    monkeypatch.setattr(w.views, "hideOutline", lambda: outlines.append(None))
    w.onPositive()
    send(env, QE.MouseButtonPress, pos=(180, 130))
    assert send(env, QE.MouseMove, buttons=1, pos=(182, 131)) and outlines == []
    send(env, QE.MouseMove, buttons=1, pos=(230, 170))
    assert outlines == [((180.0, 170.0), (230.0, 130.0))]  # display y is flipped
    send(env, QE.MouseButtonRelease, pos=(230, 170))
    assert outlines[-1] is None
    run_event_loop()
    # No segmentation was chosen: one was made on the view's volume, with a segment.
    editor = w.ui.segmentEditorWidget
    assert editor.volume is scene.volume and editor.segmentation is not None
    assert editor.segmentation is not scene.segmentation and editor.segment
    box = w.markers.box_node
    assert box is not None and box.GetNumberOfDefinedControlPoints() == 1
    size = w.markers.box_node.GetSize()
    np.testing.assert_allclose(size, (10.0, 8.0, 10.0), atol=1e-6)  # 50 x 40 px at 0.2 mm
    w.logic.wait()
    w.onPoll()
    calls = [c[0] for s in w.logic.engine.sessions for c in s.calls]
    assert calls[0] == "box"  # (the stub session then segments the box's centre)
    w.onUndo()  # the box's result is undone: its ROI goes too
    assert w.markers.box_node.GetNumberOfControlPoints() == 0


def test_prompt_before_the_model_is_loaded_is_kept_and_runs_once_loaded(env, monkeypatch):
    """Review m7: the first click starts loading (outside the view event) and is not lost."""
    w = env.widget
    engine, w.logic = w.logic.engine, None
    loads = []

    def load():
        loads.append(1)
        w.modelSetup.future = object()

    monkeypatch.setattr(w, "onLoadModel", load)
    w.onPositive()
    send(env, QE.MouseButtonPress)
    send(env, QE.MouseButtonRelease)
    assert loads == []  # not inside the view's event handler
    run_event_loop()
    assert loads == [1] and len(w.deferred) == 1 and marker_count(env) == 1
    assert "Loading the model" in w.ui.statusLabel.text
    given_for = w.ui.segmentEditorWidget.segment
    w.onNewSegment()  # the user moves on while the model loads
    assert w.ui.segmentEditorWidget.segment != given_for
    w.modelSetup.future, w.logic = None, InteractiveLogic(engine)
    w._runDeferred()
    w.logic.wait()
    w.onPoll()
    assert w.deferred == [] and w.ui.latencyLabel.text.startswith("Last prompt")
    # It ran on the segment it was given for, not on the one selected since.
    assert w.logic.segment_id == given_for
    world = interaction.xy_to_ras(env.view.node, interaction.display_xy(200, 150, 300))
    assert w.logic.prompts()[0].world == tuple(world)


def test_prompt_refused_visibly_when_the_model_cannot_load(env, monkeypatch):
    w = env.widget
    w.logic = None
    monkeypatch.setattr(w, "onLoadModel", lambda: None)  # e.g. the user cancelled a dialog
    w.onPositive()
    send(env, QE.MouseButtonPress)
    send(env, QE.MouseButtonRelease)
    run_event_loop()
    assert marker_count(env) == 0 and w.deferred == []
    assert "not loaded" in env.messages[-1]


def test_prompts_beyond_the_queue_limit_are_refused_with_a_message(env, monkeypatch):
    w = env.widget
    monkeypatch.setattr(w.logic, "pending_count", lambda: interaction.MAX_QUEUED_PROMPTS)
    w.onPositive()
    send(env, QE.MouseButtonPress)
    send(env, QE.MouseButtonRelease)
    run_event_loop()
    assert marker_count(env) == 0 and "not placed" in env.messages[-1]


def test_undo_while_predicting_is_refused_with_a_message(env):
    w, scene = env.widget, env.scene
    w.ui.segmentEditorWidget.volume = scene.volume
    w.ui.segmentEditorWidget.segmentation = scene.segmentation
    w.ui.segmentEditorWidget.segment = scene.target
    w.logic.set_target(scene.volume, scene.segmentation, scene.target)
    w.logic.add_point(scene.world_of_ijk((22, 20, 18)), True)
    w.onUndo()
    assert "Wait for the running prediction" in env.messages[-1]
    w.logic.wait()


def test_long_prediction_shows_elapsed_seconds(env, monkeypatch):
    w, scene = env.widget, env.scene
    w.logic.set_target(scene.volume, scene.segmentation, scene.target)
    w.logic.add_point(scene.world_of_ijk((22, 20, 18)), True)
    w.logic.add_point(scene.world_of_ijk((20, 20, 18)), True)
    monkeypatch.setattr(w.logic, "busy_seconds", lambda: 3.4)
    w._showResults([])
    assert w.ui.statusLabel.text == "Predicting... 3 s (1 more queued)"
    assert env.messages[-1] == w.ui.statusLabel.text
    w.logic.wait()


def test_another_tool_or_an_editor_effect_stops_prompting(env):
    w = env.widget
    w.onPositive()
    node = env.interaction_node
    node.SetCurrentInteractionMode(node.Place)
    w.onInteractionModeChanged(node)
    assert not w.capture.active and "another tool" in env.messages[-1]
    w.onPositive()
    assert node.GetCurrentInteractionMode() == node.ViewTransform
    w.editorNode.SetActiveEffectName("Paint")
    w.masking.onEditorNodeModified()
    assert not w.capture.active and not w.ui.positivePointButton.checked


def test_leaving_the_module_stops_prompting_effects_and_shortcuts(env):
    w = env.widget
    w.onPositive()
    send(env, QE.MouseButtonPress)  # a gesture in progress is dropped too
    w.exit()
    assert not w.capture.active and not w.capture.pressing
    assert ("setActiveEffect", None) in w.ui.segmentEditorWidget.calls
    assert ("removeViewObservations",) in w.ui.segmentEditorWidget.calls
    assert w.shortcuts == [] and w.views.filters == []
    assert not send(env, QE.MouseButtonPress)


def test_masking_controls_show_and_write_the_shared_node(env):
    w, scene = env.widget, env.scene
    w.editorNode.SetAndObserveSegmentationNode(scene.segmentation)
    w.masking.onEditorNodeModified()
    items = w.ui.editableAreaComboBox.items
    assert items[0] == "Everywhere" and items[-2:] == ["Inside target", "Inside other"]
    w.masking.onEditableAreaChosen(len(items) - 1)
    single = slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
    assert w.editorNode.GetMaskMode() == single
    assert w.editorNode.GetMaskSegmentID() == scene.other
    w.masking.onOverwriteChosen(2)
    assert w.editorNode.GetOverwriteMode() == w.editorNode.OverwriteNone
    # A segment added (or renamed) anywhere shows up in the editable-area choices at once.
    scene.segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    assert w.ui.editableAreaComboBox.items[-1] == "Inside liver"


def test_scene_close_mid_prediction_drops_the_result_and_the_old_nodes(env):
    """Review M8/m10: the old scene's result is never written; nothing keeps its nodes."""
    w, scene = env.widget, env.scene
    editor = w.ui.segmentEditorWidget
    editor.volume, editor.segmentation, editor.segment = (
        scene.volume,
        scene.segmentation,
        scene.target,
    )
    w.onPositive()
    w.markers.add(interaction.PointPrompt(tuple(scene.world_of_ijk((22, 20, 18))), True))
    w.logic.set_target(scene.volume, scene.segmentation, scene.target)
    w.logic.add_point(scene.world_of_ijk((22, 20, 18)), True, tag="x")
    w.onSceneClose()
    assert w.markers.point_node is None and w.editorNode is None and w.masking.segmentation is None
    w.logic.wait()
    w.onPoll()
    assert not scene.segment(scene.target).any()
    assert "failed" not in w.ui.statusLabel.text


def test_new_segment_visibility_and_delete_keys(env):
    w, scene = env.widget, env.scene
    editor = w.ui.segmentEditorWidget
    editor.volume, editor.segmentation, editor.segment = (
        scene.volume,
        scene.segmentation,
        scene.target,
    )
    segmentation = scene.segmentation.GetSegmentation()
    n = segmentation.GetNumberOfSegments()
    w.onNewSegment()  # N
    assert segmentation.GetNumberOfSegments() == n + 1 and editor.segment != scene.target
    new = editor.segment
    display = scene.segmentation.GetDisplayNode()
    w.onToggleSegmentVisibility()  # H
    assert not display.GetSegmentVisibility(new)
    w.onToggleSegmentVisibility()
    assert display.GetSegmentVisibility(new)
    w.onDeleteSegment()  # Shift+Delete (no question under --testing)
    assert segmentation.GetSegment(new) is None and segmentation.GetNumberOfSegments() == n


def test_model_controls_are_disabled_while_predicting_or_loading(env):
    """Review m1: no way to swap the network under a running prediction."""
    w, scene = env.widget, env.scene
    ui = w.ui
    w._updateButtons()
    assert ui.loadModelButton.enabled and ui.weightsComboBox.enabled and ui.deviceComboBox.enabled
    w.logic.set_target(scene.volume, scene.segmentation, scene.target)
    w.logic.add_point(scene.world_of_ijk((22, 20, 18)), True)
    w._updateButtons()
    for control in (
        ui.loadModelButton,
        ui.weightsComboBox,
        ui.deviceComboBox,
        ui.undoButton,
        ui.resetSegmentButton,
        ui.clearButton,
        ui.removeWeightsButton,
    ):
        assert not control.enabled
    w.logic.wait()
    w.modelSetup.future = object()  # a model loading
    w._updateButtons()
    assert not ui.loadModelButton.enabled and not ui.deviceComboBox.enabled
    w.modelSetup.future = None


def test_polarity_is_a_remembered_preference(env):
    w = env.widget
    w.onNegative()
    assert params.Preferences.load(FakeSettings()).positive is False
    w.togglePolarity()
    assert params.Preferences.load(FakeSettings()).positive is True


def test_choices_live_in_the_parameter_node_and_a_new_scene_starts_from_the_preferences(env):
    """Style review 3: the user's choices are in the module's parameter node (saved with the
    scene); the per-user preferences follow them and seed a new scene's node."""
    w, scene = env.widget, env.scene.scene
    node = w._choices()
    raw = node.parameterNode
    assert raw.GetSingletonTag() == "FastSAM3DSlicer" and raw.GetScene() is scene
    assert (node.weights, node.device, node.positive) == ("fastsam3d", "auto", True)
    w.onNegative()
    assert raw.GetParameter("positive") == "False"
    assert params.Preferences.load(FakeSettings()).positive is False
    params.Preferences("sam-med3d-turbo", "cpu", False).save(FakeSettings())
    w.onSceneClose()
    scene.RemoveNode(raw)  # the scene's node goes with it
    fresh = w._choices()
    assert (fresh.weights, fresh.device, fresh.positive) == ("sam-med3d-turbo", "cpu", False)
    assert fresh.parameterNode is not raw and not w.capture.positive
    # A loaded scene's own choices win over the preferences.
    fresh.device = "cuda"
    w._parameterNode = None
    assert w._choices().device == "cuda"


class ErrorDisplay:
    """slicer.util.tryWithErrorDisplay as a recorder: the message and the error it showed. As
    Slicer's (Base/Python/slicer/util.py), it raises the error again after showing it."""

    def __init__(self) -> None:
        self.shown = []

    def __call__(self, message="", waitCursor=False):  # noqa: N803 - Slicer's name
        import contextlib

        @contextlib.contextmanager
        def show():
            try:
                yield
            except Exception as e:
                self.shown.append((message, e))
                raise

        return show()


def _submit_click(env, prompt_call=None) -> None:
    """What _onPrompt does after the target is chosen: a marker, then the Lib call."""
    w, scene = env.widget, env.scene
    editor = w.ui.segmentEditorWidget
    editor.volume, editor.segmentation, editor.segment = (
        scene.volume,
        scene.segmentation,
        scene.target,
    )
    world = tuple(scene.world_of_ijk((22, 20, 18)))
    tag = w.markers.add(interaction.PointPrompt(world, True))
    with slicer.util.tryWithErrorDisplay("FastSAM3D could not use this prompt."):
        w._submit(lambda: w.logic.add_point(world, True, tag=tag), tag)


def test_lib_refusals_are_a_status_line_and_other_errors_reach_the_error_display(env, monkeypatch):
    """Style review 3: _submit catches the Lib's one root (FastSAM3DSlicerError); a deleted
    segment (SegmentMissingError, a KeyError before) is a refusal, not a bug; anything else
    reaches Slicer's error display. The prompt's marker goes in both cases."""
    display = ErrorDisplay()
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", display, raising=False)
    w, scene = env.widget, env.scene
    _submit_click(env)
    w.logic.wait()
    w.onPoll()
    assert marker_count(env) == 1 and display.shown == []
    scene.segmentation.GetSegmentation().RemoveSegment(scene.target)
    _submit_click(env)
    assert "was it deleted?" in env.messages[-1] and display.shown == []
    assert marker_count(env) == 1  # the refused prompt's marker went
    monkeypatch.setattr(w.logic, "add_point", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # shown, then raised on into Qt's slot call
        _submit_click(env)
    [(message, error)] = display.shown
    assert "could not use this prompt" in message and isinstance(error, ZeroDivisionError)
    assert marker_count(env) == 1


def test_a_waiting_prompts_error_is_shown_and_the_next_ones_still_run(env, monkeypatch):
    """Prompts given while the model loaded run from the timer's tick (no slot guards it): an
    unexpected error of one reaches the error display and takes its marker; the next prompt
    still runs (before, the error left onPoll for the console only, the next prompt was
    dropped and its marker stayed)."""
    display = ErrorDisplay()
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", display, raising=False)
    w, scene = env.widget, env.scene
    editor = w.ui.segmentEditorWidget
    editor.volume, editor.segmentation, editor.segment = (
        scene.volume,
        scene.segmentation,
        scene.target,
    )
    add_point, calls = w.logic.add_point, []

    def first_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug")
        return add_point(*args, **kwargs)

    monkeypatch.setattr(w.logic, "add_point", first_fails)
    for ijk in ((22, 20, 18), (24, 20, 18)):
        prompt = interaction.PointPrompt(tuple(scene.world_of_ijk(ijk)), True)
        w.deferred.append((prompt, w.markers.add(prompt), None))
    w._runDeferred()
    w.logic.wait()
    w.onPoll()
    [(message, error)] = display.shown
    assert "could not use this prompt" in message and isinstance(error, ZeroDivisionError)
    assert len(calls) == 2 and w.deferred == [] and marker_count(env) == 1
    assert w.ui.latencyLabel.text.startswith("Last prompt")  # the second one was written


def test_guarded_slots_show_unexpected_errors_in_slicers_error_display(env, monkeypatch):
    display = ErrorDisplay()
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", display, raising=False)
    calls = []
    env.widget._guarded(lambda: calls.append(1))(True)  # a clicked(bool) argument is dropped
    assert calls == [1] and display.shown == []
    with pytest.raises(KeyError):  # shown, then raised on into Qt's slot call (it logs it)
        env.widget._guarded(lambda: {}["missing"])()
    [(message, error)] = display.shown
    assert "this action failed" in message and isinstance(error, KeyError)


@pytest.mark.parametrize("outcome", ["downloaded", "failed"])
def test_download_events_reach_the_panel_and_the_waiting_prompt(env, monkeypatch, outcome):
    """The Widget's side of setup_flow's download events: a prompt given before the weights
    were there loads the model once they are, or goes (with its marker) when they fail."""
    from test_setup_flow import FakeTask

    from FastSAM3DSlicerLib import weights

    w, tasks, errors, loads = env.widget, [], [], []
    w.logic.close()
    w.logic = None
    monkeypatch.setattr(weights, "remote_size", lambda name, timeout=None: 1000)
    monkeypatch.setattr(
        weights, "DownloadTask", lambda key: tasks.append(FakeTask(key)) or tasks[-1]
    )
    monkeypatch.setattr(slicer.util, "errorDisplay", errors.append, raising=False)
    monkeypatch.setattr(w, "onLoadModel", lambda: loads.append(1))
    w._weightChoices = [weights.Choice("fastsam3d", "FastSAM3D", "", "terms")]
    w.ui.weightsComboBox.currentIndex = 0
    w.onDownloadWeights()
    assert w.modelSetup.state == "downloading" and w.pollTimer.active
    w._updateButtons()
    assert not w.ui.loadModelButton.enabled and not w.ui.downloadWeightsButton.enabled
    prompt = interaction.PointPrompt(tuple(env.scene.world_of_ijk((22, 20, 18))), True)
    w.deferred.append((prompt, w.markers.add(prompt), None))
    tasks[0].done, tasks[0].total = 500, 1000
    w.onPoll()  # half-way: nothing ends
    assert w.modelSetup.state == "downloading" and errors == [] and loads == []
    tasks[0].finish(error=OSError("disk full") if outcome == "failed" else None)
    w.onPoll()
    assert w.modelSetup.state == "idle" and not w.pollTimer.active
    if outcome == "failed":
        assert errors == ["Download failed: disk full"] and loads == []
        assert w.deferred == [] and marker_count(env) == 0
    else:
        assert errors == [] and loads == [1] and len(w.deferred) == 1


def test_setup_builds_the_panel_from_the_ui_and_the_parameter_node(env, monkeypatch):
    """Widget.setup() as Slicer calls it (loadUI, childWidgetVariables, the logic, the
    parameter node, signals, observers), with the .ui's widgets stood in."""
    import widget_harness

    w, module = env.widget, env.module
    w.logic.close()
    w.logic = None  # no network yet
    params.Preferences("fastsam3d", "cpu", False).save(FakeSettings())
    env.scene.scene.RemoveNode(w._choices().parameterNode)  # a new scene: seeded again
    connected = []

    class Signal:
        def __init__(self, name) -> None:
            self.name = name

        def connect(self, slot) -> None:
            connected.append((self.name, slot))

    class Control(Widget):
        def __getattr__(self, name):
            if name in ("clicked", "toggled", "currentIndexChanged", "editingFinished"):
                return Signal(name)
            return Anything()

    ui = widget_harness.UI(segmentEditorWidget=w.ui.segmentEditorWidget)
    combos = ("deviceComboBox", "backendComboBox", "weightsComboBox")
    for name in combos:
        setattr(ui, name, ComboBox())
    ui.serverUrlLineEdit = Control(text="")
    for name in ("loadModelButton", "undoButton", "installDependenciesButton"):
        setattr(ui, name, Control(enabled=True))
    ui.polarityLabel = Widget(text="")
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: Anything(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    monkeypatch.setattr(
        slicer.app, "layoutManager", lambda: types.SimpleNamespace(connect=lambda *a: None)
    )
    w._parameterNode, w.capture = None, None
    w.layout, w.resourcePath = Anything(), lambda path: path
    try:
        w.setup()
    finally:
        w.removeObservers()  # scene and interaction-node observers of this stand-in Widget
    assert w.ui is ui and isinstance(w.moduleLogic, module.FastSAM3DSlicerLogic)
    assert ui.deviceComboBox.items == list(params.DEVICES)
    assert (w._choices().device, w.capture.positive) == ("cpu", False)  # from the preferences
    assert ui.deviceComboBox.currentText == "cpu"  # the panel shows the node
    connected += [
        ("currentIndexChanged", slot)
        for name in combos
        for slot in getattr(ui, name).currentIndexChanged.slots
    ]
    assert "negative" in ui.polarityLabel.text
    assert ui.loadModelButton.enabled and not ui.undoButton.enabled  # no network yet
    slots = {name for name, _slot in connected}
    assert {"clicked", "currentIndexChanged", "editingFinished"} <= slots
    assert len(connected) == 7  # each stood-in control's signal, once
    assert all("_guarded" in slot.__qualname__ for _name, slot in connected)  # error display


# -- the parameter node and the panel, both ways (issue 15) -----------------------------------

WEIGHTS = (("fastsam3d", "FastSAM3D (fast, default)"), ("sam-med3d-turbo", "SAM-Med3D-turbo"))


@pytest.fixture
def panel(env, monkeypatch):
    """The Widget with its weights listed (labels shown, keys as item data) and the two combos'
    signals connected to their slots as setup() connects them."""
    from FastSAM3DSlicerLib import weights

    w = env.widget
    choices = [weights.Choice(key, label, "", "terms") for key, label in WEIGHTS]
    monkeypatch.setattr(weights, "choices", lambda: choices)
    monkeypatch.setattr(weights, "status_text", lambda key: f"{key}: not downloaded")
    w._refreshWeights()
    w.ui.weightsComboBox.currentIndexChanged.connect(w._guarded(w.onWeightsChanged))
    w.ui.deviceComboBox.currentIndexChanged.connect(w._guarded(w.onDeviceChanged))
    w.parent = types.SimpleNamespace(isEntered=True)  # the module is shown
    return env


def import_scene_choices(scene, **parameters) -> None:
    """File > Import Scene of a scene saved with these choices: MRML copies the saved
    FastSAM3DSlicer singleton node into the open scene's own (one Modified event)."""
    saved = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetSingletonTag("FastSAM3DSlicer")
    node = saved.AddNode(node)
    for name, value in parameters.items():
        node.SetParameter(name, value)
    saved.SetSaveToXMLString(1)
    saved.Commit()
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(saved.GetSceneXMLString())
    scene.Import()
    scene.SetLoadFromXMLString(0)


def shown_choices(w) -> tuple:
    """What the panel shows: the weights label, the device, the next point's polarity."""
    return w.ui.weightsComboBox.currentText, w.ui.deviceComboBox.currentText, w.capture.positive


def test_an_imported_scenes_choices_reach_the_panel_not_the_preferences(panel):
    """Issue 15: a scene loaded over the open one brings its weights, device and polarity into
    the panel (the weights combo shows the label of the node's key); the network loaded for
    other weights goes; the user's preferences stay theirs."""
    w = panel.widget
    assert shown_choices(w) == ("FastSAM3D (fast, default)", "auto", True)
    import_scene_choices(
        panel.scene.scene, weights="sam-med3d-turbo", device="cpu", positive="False"
    )
    assert (w._choices().weights, w._choices().device) == ("sam-med3d-turbo", "cpu")
    assert shown_choices(w) == ("SAM-Med3D-turbo", "cpu", False)
    assert "negative" in w.ui.polarityLabel.text
    assert w.ui.weightsStatusLabel.text == "sam-med3d-turbo: not downloaded"
    assert w.logic is None  # loaded for FastSAM3D: no click may run on it now
    assert params.Preferences.load(FakeSettings()) == params.Preferences()


def test_a_change_in_the_panel_reaches_the_node_and_the_preferences(panel):
    """After a scene load, the user's change is written to the node and the preferences, and
    the scene's other choices are kept (before, the device change wrote the panel's stale
    weights over the scene's)."""
    w = panel.widget
    import_scene_choices(
        panel.scene.scene, weights="sam-med3d-turbo", device="cpu", positive="False"
    )
    w.ui.deviceComboBox.choose("cuda")
    node = w._choices()
    assert (node.weights, node.device, node.positive) == ("sam-med3d-turbo", "cuda", False)
    assert params.Preferences.load(FakeSettings()) == params.Preferences(
        "sam-med3d-turbo", "cuda", False
    )
    w.ui.weightsComboBox.choose("fastsam3d")
    assert node.parameterNode.GetParameter("weights") == "fastsam3d"
    assert params.Preferences.load(FakeSettings()).weights == "fastsam3d"
    assert shown_choices(w) == ("FastSAM3D (fast, default)", "cuda", False)


def test_scene_close_binds_the_panel_to_the_new_node(panel):
    """Scene close unbinds (the node's reset does not reach the panel), the new scene's node
    starts from the preferences and is bound: a scene imported later reaches the panel. Leaving
    the module unbinds too; entering it again shows what changed meanwhile."""
    w, scene = panel.widget, panel.scene.scene
    w.ui.weightsComboBox.choose("sam-med3d-turbo")
    w.ui.deviceComboBox.choose("cpu")
    w.onSceneClose()
    scene.Clear(0)  # the module's singleton node is reset, not removed
    assert shown_choices(w)[:2] == ("SAM-Med3D-turbo", "cpu")  # not the reset node's defaults
    w.onSceneClosed()
    node = w._choices()
    assert (node.weights, node.device) == ("sam-med3d-turbo", "cpu")  # from the preferences
    import_scene_choices(scene, weights="fastsam3d", device="auto", positive="False")
    assert shown_choices(w) == ("FastSAM3D (fast, default)", "auto", False)
    w.exit()
    import_scene_choices(scene, weights="sam-med3d-turbo", device="cpu", positive="True")
    assert shown_choices(w) == ("FastSAM3D (fast, default)", "auto", False)  # not shown
    w.initializeParameterNode()  # what enter() does first
    assert shown_choices(w) == ("SAM-Med3D-turbo", "cpu", True)


def test_developer_reload_imports_the_panels_slots_anew(env, monkeypatch):
    """Slicer's Reload (slicer.util.reloadScriptedModule) executes FastSAM3DSlicer.py again but
    not the modules it imports: without the Widget's onReload, edits to the panel's slots in
    FastSAM3DSlicerQt were silently not reloaded."""
    import importlib.util

    base = sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleWidget
    reloaded = []

    def reload_scripted_module(self) -> None:  # what Slicer's onReload runs
        spec = importlib.util.spec_from_file_location(
            "FastSAM3DSlicer_reloaded", env.module.__file__
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reloaded.append(module)

    monkeypatch.setattr(base, "onReload", reload_scripted_module, raising=False)
    env.widget.onReload()
    [module] = reloaded
    assert module.PromptsPanel is not env.module.PromptsPanel
    assert module.SetupPanel is not env.module.SetupPanel
    assert sys.modules["FastSAM3DSlicerQt.setup_panel"].SetupPanel is module.SetupPanel


def test_a_scene_imported_while_predicting_unloads_the_network_once_written(panel):
    """The combos are disabled while a prediction runs, but a scene imported then can bring
    other weights: the running prediction is written, then the network goes (before, the
    refused drop left it loaded under the panel's new weights)."""
    w, scene = panel.widget, panel.scene
    w.logic.set_target(scene.volume, scene.segmentation, scene.target)
    w.logic.add_point(scene.world_of_ijk((22, 20, 18)), True)
    assert w.logic.busy
    import_scene_choices(scene.scene, weights="sam-med3d-turbo")
    assert w.logic is not None and shown_choices(w)[0] == "SAM-Med3D-turbo"
    for _tick in range(200):  # the timer's ticks (each waits up to its poll time)
        if w.logic is None:
            break
        w.onPoll()
    assert w.ui.latencyLabel.text.startswith("Last prompt")  # written first
    assert w.logic is None and not w._dropWhenIdle
