"""The Lib with the REAL fastsam3d.Session and the fixture-weight network (no download).

The fixture weights make the network's mask arbitrary, so this test checks what does not
depend on the mask's shape: the click reaches the session in the volume's own RAS, the segment
equals the session's result inside the result's region (nothing else changes), the other
segment is untouched, undo restores the labelmap and steps the session back. Where the voxels
land relative to the click is checked with the deterministic session in test_slicer_logic_mrml.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_scene import build_scene

torch = pytest.importorskip("torch")
fastsam3d = pytest.importorskip("fastsam3d")
testing = pytest.importorskip("fastsam3d.testing")

from FastSAM3DSlicerLib.engine import FastSAM3DEngine  # noqa: E402
from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    # No propagation: the fixture mask is arbitrary and would grow into neighbour crops.
    return FastSAM3DEngine.from_model(
        testing.fixture_model("fastsam3d"), device="cpu", propagate=False
    )


@pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")
def test_real_session_click_and_undo_on_transformed_oblique_volume(engine):
    # 140 voxels of 2 mm along i: wider than one 192 mm crop, so the region is a strict part.
    scene = build_scene(shape_kji=(40, 48, 140), spacing=(2.0, 2.0, 2.0))
    logic = InteractiveLogic(engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    before_target = scene.segment(scene.target)
    before_other = scene.segment(scene.other)
    ijk = (70, 24, 20)
    world = scene.world_of_ijk(ijk)

    logic.add_point(world, True)
    (record,) = logic.wait()
    assert not isinstance(record, FailedEdit), record
    session = logic._sessions[next(iter(logic._sessions))].session
    assert isinstance(session, fastsam3d.Session)
    # Every segment's session runs on the engine's one prepared network (no copy per segment).
    assert session.runner is engine.runner
    result = session.result

    # The session got the click in the volume's own RAS: its voxel is the clicked one.
    np.testing.assert_allclose(
        session.volume.ras_to_ijk(np.array(record.prompt.volume_ras)), ijk, atol=1e-6
    )
    # The segment equals the result inside the region and is unchanged outside it.
    assert result.voxels > 0, "empty fixture mask: the consistency checks would be vacuous"
    region = tuple(result.region)
    assert region == record.region
    inside = np.zeros(scene.shape, bool)
    inside[region] = True
    assert 0 < inside.sum() < inside.size
    after = scene.segment(scene.target)
    np.testing.assert_array_equal(after[region], result.mask)
    np.testing.assert_array_equal(after[~inside], before_target[~inside])
    other = scene.segment(scene.other)
    if not (result.mask & before_other[region]).any():
        np.testing.assert_array_equal(other, before_other)
    else:  # overwrite-all (Slicer's default) may only take voxels the target now holds
        assert ((before_other & ~other) <= after).all()

    assert logic.undo() is not None
    np.testing.assert_array_equal(scene.segment(scene.target), before_target)
    np.testing.assert_array_equal(scene.segment(scene.other), before_other)
    assert not session.can_undo


@pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")
def test_undo_history_follows_the_sessions_bounded_history():
    # fastsam3d.Session keeps at most max_undo steps; the Lib used to keep every record and
    # call session.undo() past the session's oldest step, which raised half-way through an
    # undo (record popped, labelmap not restored).
    engine = FastSAM3DEngine.from_model(
        testing.fixture_model("fastsam3d"), device="cpu", propagate=False, max_undo=2
    )
    scene = build_scene(shape_kji=(40, 48, 60), spacing=(2.0, 2.0, 2.0))
    logic = InteractiveLogic(engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    after = []
    for ijk in ((30, 24, 20), (32, 22, 20), (28, 26, 21)):
        logic.add_point(scene.world_of_ijk(ijk), True)
        (record,) = logic.wait()
        assert not isinstance(record, FailedEdit), record
        after.append(scene.segment(scene.target).copy())
    assert len(logic.prompts()) == 2
    assert logic.undo() is not None
    np.testing.assert_array_equal(scene.segment(scene.target), after[1])
    assert logic.undo() is not None
    np.testing.assert_array_equal(scene.segment(scene.target), after[0])
    assert logic.undo() is None  # nothing left that the session can step back to
