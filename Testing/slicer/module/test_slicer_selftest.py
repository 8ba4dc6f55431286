"""The self-test's yardstick, checked on real MRML (slicer-core) without the Slicer window.

``FastSAM3DSlicerLib/selftest.py`` drives the Widget inside Slicer and compares the segment
with :func:`selftest.expected_segments` (the engine alone, on the same volume and prompts).
Here the same phantom, engine and comparison run against the Lib's InteractiveLogic (what the
Widget calls) on slicer-core: the yardstick must agree with what the Lib writes after a point,
a box and each undo, and must notice a different prompt. That the Widget's mouse handling
produces those prompts only a real Slicer window can show (docs/slicer.md).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "FastSAM3DSlicer"
sys.path.insert(0, str(MODULE_DIR))

pytest.importorskip("torch")
slicer = pytest.importorskip("slicer")

from FastSAM3DSlicerLib import mrml, selftest, weights  # noqa: E402
from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic  # noqa: E402
from FastSAM3DSlicerLib.worker import InferenceWorker  # noqa: E402


@pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")
def test_expected_segments_match_what_the_lib_writes(monkeypatch):
    monkeypatch.delenv("FASTSAM3D_TEST_CHECKPOINT", raising=False)
    monkeypatch.setattr(weights, "is_downloaded", lambda name: False)  # offline: fixture net
    mrml.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume, center = selftest.synthetic_volume(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("phantom")

    worker = InferenceWorker()
    engine, kind = selftest.load_engine(worker)
    assert kind == "fixture"
    logic = InteractiveLogic(engine, worker)
    logic.set_target(volume, segmentation, segment_id)
    check = unittest.TestCase()

    logic.add_point(center, True)
    assert not any(isinstance(r, FailedEdit) for r in logic.wait())
    after_point = selftest.segment_array(segmentation, volume, segment_id)
    corners = np.array([center + np.array([a, b, c]) for a in (-20, 20) for b in (-20, 20)
                        for c in (-20, 20)], float)
    logic.add_box(corners)
    assert not any(isinstance(r, FailedEdit) for r in logic.wait())
    after_box = selftest.segment_array(segmentation, volume, segment_id)

    prompts = logic.prompts()
    assert [p.kind for p in prompts] == ["point", "box"]
    want = selftest.expected_segments(engine, worker, volume, prompts)
    assert want[0].sum() > 0 and not np.array_equal(want[0], want[1])
    selftest.assert_same_voxels(check, after_point, want[0], "after the point", exact=True)
    selftest.assert_same_voxels(check, after_box, want[1], "after the box", exact=True)

    # The yardstick notices a different prompt (the point moved by 9 mm).
    moved = [prompts[0].__class__(**{**prompts[0].__dict__, "volume_ras": tuple(
        np.asarray(prompts[0].volume_ras) + (9.0, 0.0, 0.0))})]
    other = selftest.expected_segments(engine, worker, volume, moved)
    with pytest.raises(AssertionError, match="voxels differ from the engine's own result"):
        selftest.assert_same_voxels(check, after_point, other[0], "moved point", exact=True)

    assert logic.undo() is not None
    selftest.assert_same_voxels(check, selftest.segment_array(segmentation, volume, segment_id),
                                after_point, "after one undo", exact=True)
    assert logic.undo() is not None
    assert not selftest.segment_array(segmentation, volume, segment_id).any()
    logic.close()


def test_skips_without_torch(monkeypatch):
    real = selftest.importlib.util.find_spec
    monkeypatch.setattr(selftest.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))

    class Case(unittest.TestCase):
        def runTest(self):  # noqa: N802
            selftest.run_widget_prompt_test(self)

    result = unittest.TestResult()
    Case().run(result)
    assert len(result.skipped) == 1 and "torch is not installed" in result.skipped[0][1]
    assert not result.failures and not result.errors


def test_the_module_test_class_runs_the_selftest():
    """Slicer's runner looks the test up in FastSAM3DSlicer.py: it must call selftest, have a
    test_ method (runUnitTest) and a runTest (Reload and Test), and not download anything."""
    source = (MODULE_DIR / "FastSAM3DSlicer.py").read_text()
    tree = ast.parse(source)
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)
              and n.name == "FastSAM3DSlicerTest"]
    methods = {f.name: ast.unparse(f) for f in cls.body if isinstance(f, ast.FunctionDef)}
    tests = [name for name in methods if name.startswith("test_")]
    assert tests and all("selftest.run_widget_prompt_test" in methods[t] for t in tests)
    assert "selftest.run_in_reload_and_test" in methods["runTest"]
    assert "SampleData" not in ast.unparse(cls)


# -- the self-test itself, through the real Widget code with Qt and the app stood in ---------


class _UI(types.SimpleNamespace):
    """The Widget's ``self.ui``: named widgets given, any other one a permissive stand-in."""

    def __getattr__(self, name):
        from test_interaction_widget import Widget

        return self.__dict__.setdefault(name, Widget())


class _Button:
    def __init__(self, slot) -> None:
        self.slot, self.enabled = slot, True

    def click(self) -> None:
        if self.enabled:
            self.slot()


@pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")
def test_selftest_drives_the_widget_with_qt_stood_in(monkeypatch):
    """run_widget_prompt_test as Slicer runs it, except that Qt and the app are the stand-ins
    of core/test_interaction_widget.py: mouse events reach the Widget's own onViewEvent,
    singleShot callbacks run when the self-test pumps events, the scene, slice node,
    segmentation and Lib are real. Real Qt event delivery and pixels stay for real Slicer."""
    sys.path.insert(0, str(REPO / "Testing" / "slicer" / "core"))
    import test_interaction_widget as harness

    from FastSAM3DSlicerLib import interaction, params

    monkeypatch.delenv("FASTSAM3D_TEST_CHECKPOINT", raising=False)
    monkeypatch.setattr(weights, "is_downloaded", lambda name: False)
    mrml.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    qt = harness.fake_qt()
    harness.FakeTimer.pending = []
    harness.FakeSettings.data = {}
    views = {}

    def send_event(view, event):
        return widget.onViewEvent(views[id(view)], view, event)

    qt.QPointF = lambda x, y: types.SimpleNamespace(x=lambda: x, y=lambda: y)
    qt.QMouseEvent = lambda kind, pos, button, buttons, modifiers: harness.Event(
        kind, button, buttons, modifiers, (pos.x(), pos.y()))
    qt.QApplication = types.SimpleNamespace(sendEvent=send_event,
                                            restoreOverrideCursor=lambda: None,
                                            setOverrideCursor=lambda *a: None,
                                            overrideCursor=lambda: None)
    qt.QEvent.MouseButtonRelease = 3
    qt.Qt.NoButton = 0
    monkeypatch.setitem(sys.modules, "qt", qt)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a: None}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)

    def process_events():
        while harness.FakeTimer.pending:
            harness.FakeTimer.pending.pop(0)()

    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetDimensions(400, 300, 1)
    slice_node.SetFieldOfView(160.0, 120.0, 1.0)  # 0.4 mm per pixel, axial
    red = harness.SliceWidget(slice_node, None)
    views[id(red.view)] = red
    layout = types.SimpleNamespace(sliceWidget=lambda name: red if name == "Red" else None)
    interaction_node = scene.AddNewNodeByClass("vtkMRMLInteractionNode")
    app = types.SimpleNamespace(
        processEvents=process_events, testingEnabled=lambda: True, layoutManager=lambda: layout,
        applicationLogic=lambda: types.SimpleNamespace(GetInteractionNode=lambda: interaction_node),
        connect=lambda *a: None, disconnect=lambda *a: None)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    for name, value in (("showStatusMessage", lambda *a: None), ("selectModule", lambda m: None),
                        ("setSliceViewerLayers", lambda **k: None),
                        ("tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext()),
                        ("WaitCursor", contextlib.nullcontext), ("mainWindow", lambda: None)):
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    spec = importlib.util.spec_from_file_location(
        "FastSAM3DSlicer_selftest_run", MODULE_DIR / "FastSAM3DSlicer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    widget = module.FastSAM3DSlicerWidget(None)
    editor = harness.Editor()
    editor.owner = widget
    widget.ui = _UI(segmentEditorWidget=editor, statusLabel=harness.Widget(text=""),
                    latencyLabel=harness.Widget(text=""),
                    deviceComboBox=harness.Widget(currentText="auto"),
                    weightsComboBox=harness.Widget(currentIndex=-1),
                    undoButton=_Button(widget.onUndo))
    widget.capture = interaction.PromptCapture()
    widget.preferences = params.Preferences()
    widget.pollTimer = harness.FakeTimer()
    widget._selectEditorNode()
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        fastsam3dslicer=types.SimpleNamespace(
            widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: widget))),
        raising=False)

    class Case(unittest.TestCase):
        messages: list = []

        def delayDisplay(self, message, msec=None):  # noqa: N802 - Slicer's name
            self.messages.append(message)

        def runTest(self):  # noqa: N802
            selftest.run_widget_prompt_test(self)

    result = unittest.TestResult()
    case = Case()
    case.run(result)
    try:
        assert not result.errors and not result.failures and not result.skipped, (
            result.errors or result.failures or result.skipped)
        assert case.messages[-1] == "Test passed"
        assert [p.kind for p in widget.logic.prompts()] == []  # two undos: nothing left
    finally:
        if widget.logic is not None:
            widget.logic.close()
