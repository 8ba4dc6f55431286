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
import sys
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
    corners = np.array(
        [center + np.array([a, b, c]) for a in (-20, 20) for b in (-20, 20) for c in (-20, 20)],
        float,
    )
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
    moved = [
        prompts[0].__class__(
            **{
                **prompts[0].__dict__,
                "volume_ras": tuple(np.asarray(prompts[0].volume_ras) + (9.0, 0.0, 0.0)),
            }
        )
    ]
    other = selftest.expected_segments(engine, worker, volume, moved)
    with pytest.raises(AssertionError, match="voxels differ from the engine's own result"):
        selftest.assert_same_voxels(check, after_point, other[0], "moved point", exact=True)

    assert logic.undo() is not None
    selftest.assert_same_voxels(
        check,
        selftest.segment_array(segmentation, volume, segment_id),
        after_point,
        "after one undo",
        exact=True,
    )
    assert logic.undo() is not None
    assert not selftest.segment_array(segmentation, volume, segment_id).any()
    logic.close()


def test_skips_without_torch(monkeypatch):
    real = selftest.importlib.util.find_spec
    monkeypatch.setattr(
        selftest.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real(name, *a),
    )

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
    source = (MODULE_DIR / "FastSAM3DSlicer.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    (cls,) = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FastSAM3DSlicerTest"
    ]
    methods = {f.name: ast.unparse(f) for f in cls.body if isinstance(f, ast.FunctionDef)}
    tests = [name for name in methods if name.startswith("test_")]
    assert tests and all("selftest.run_widget_prompt_test" in methods[t] for t in tests)
    assert "selftest.run_in_reload_and_test" in methods["runTest"]
    assert "SampleData" not in ast.unparse(cls)


# -- the self-test itself, through the real Widget code with Qt and the app stood in ---------


@pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")
def test_selftest_drives_the_widget_with_qt_stood_in(monkeypatch):
    """run_widget_prompt_test as Slicer runs it, except that Qt and the app are stand-ins
    (widget_harness): mouse events reach the Widget's own onViewEvent, singleShot callbacks
    run when the self-test pumps events; scene, slice node, segmentation and Lib are real.
    Real Qt event delivery and pixels stay for real Slicer."""
    import widget_harness

    monkeypatch.delenv("FASTSAM3D_TEST_CHECKPOINT", raising=False)
    monkeypatch.setattr(weights, "is_downloaded", lambda name: False)
    monkeypatch.setattr(selftest, "PROMPT_TIMEOUT_S", 120.0)  # a broken path fails sooner
    mrml.ensure_segmentation_converters()
    env = widget_harness.load_widget(monkeypatch, slicer.vtkMRMLScene())

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
            result.errors or result.failures or result.skipped
        )
        assert case.messages[-1] == "Test passed"
        assert env.widget.logic is None  # the test's network does not stay loaded
    finally:
        if env.widget.logic is not None:
            env.widget.logic.close()
