"""Nothing the user has is lost (review M1, M2, M3, M8, m1, m8): real MRML (slicer-core),
with the deterministic SphereSession so that every voxel's fate is known.

Each test fails on the code before its fix (said per test).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import vtk
from slicer_scene import _oriented, build_scene, slicer

from FastSAM3DSlicerLib import mrml, segment_writer
from FastSAM3DSlicerLib.logic import EditRecord, FailedEdit, InteractiveLogic, StaleResultError


def _wait_ok(logic):
    out = logic.wait()
    for r in out:
        if isinstance(r, FailedEdit):
            raise r.error
    return out


def _image_to_seg(scene) -> np.ndarray:
    return segment_writer.SegmentWriter(scene.segmentation, scene.volume).image_to_segmentation()


def _paint(scene, segment_id, block, value=True):
    """Paint (or erase) a block of volume voxels into a segment as Slicer's Paint would: a
    labelmap in the segmentation's own frame, merged by Slicer (not by our writer)."""
    k, j, i = scene.shape
    mask = np.zeros(scene.shape, bool)
    mask[block] = True
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if value:
        modifier, mode = mask, logic.MODE_MERGE_MAX
    else:
        modifier, mode = np.where(mask, 0, 255), logic.MODE_MERGE_MIN
    ok = logic.SetBinaryLabelmapToSegment(
        _oriented(_image_to_seg(scene), modifier), scene.segmentation, segment_id, mode
    )
    assert ok
    return mask


def _local_value(scene, segment_id, ijk) -> bool:
    """Independent of our reader: the segment's labelmap in its own frame, looked up at the
    volume voxel ``ijk`` mapped into that frame."""
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        scene.segmentation, segment_id, labelmap, False
    )
    m = vtk.vtkMatrix4x4()
    labelmap.GetWorldToImageMatrix(m)
    p = mrml.matrix_to_numpy(m) @ _image_to_seg(scene) @ np.array([*map(float, ijk), 1.0])
    idx = np.round(p[:3]).astype(int)
    ext = labelmap.GetExtent()
    if any(idx[a] < ext[2 * a] or idx[a] > ext[2 * a + 1] for a in range(3)):
        return False
    label = scene.segmentation.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return labelmap.GetScalarComponentAsDouble(*idx, 0) == label


def _count_kept(scene, segment_id, mask) -> int:
    kk, jj, ii = np.nonzero(mask)
    return sum(_local_value(scene, segment_id, (i, j, k)) for k, j, i in zip(kk, jj, ii))


def _transformed_scene(same: bool):
    scene = build_scene()
    if same:
        scene.segmentation.SetAndObserveTransformNodeID(scene.transform.GetID())
    else:
        other = slicer.vtkMRMLLinearTransformNode()
        scene.scene.AddNode(other)
        m = np.eye(4)
        a = np.deg2rad(35)
        m[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
        m[:3, 3] = [-9.0, 14.0, 3.5]
        other.SetMatrixTransformToParent(mrml.numpy_to_matrix(m))
        scene.segmentation.SetAndObserveTransformNodeID(other.GetID())
    return scene


BLOCK = (slice(14, 20), slice(16, 22), slice(18, 24))  # 6 x 6 x 6 = 216 voxels (k, j, i)


@pytest.mark.parametrize("same", [True, False], ids=["same-transform", "different-transforms"])
def test_m1_painted_voxels_under_transformed_segmentation_survive_a_click(stub_engine, same):
    # Old code: the session baseline was snapshotted in world coordinates and read as if in
    # the segmentation's frame, so a click next to the block erased most of it (143 of 216).
    scene = _transformed_scene(same)
    painted = _paint(scene, scene.target, BLOCK)
    assert painted.sum() == 216 and _count_kept(scene, scene.target, painted) == 216
    logic = InteractiveLogic(stub_engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    world = scene.world_of_ijk((27, 19, 17))  # next to the block: its region covers the block
    logic.add_point(world, True)
    (record,) = _wait_ok(logic)
    inside = np.zeros(scene.shape, bool)
    inside[record.region] = True
    assert (painted & inside).sum() > 100  # the write covered most of the painted voxels
    assert _count_kept(scene, scene.target, painted) == 216
    assert _local_value(scene, scene.target, (27, 19, 17))  # and the click itself landed


def _logic(scene, engine):
    logic = InteractiveLogic(engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    return logic


def _click_ijk(logic, scene, ijk, positive=True):
    logic.add_point(scene.world_of_ijk(ijk), positive)
    (record,) = _wait_ok(logic)
    return record


def test_m2_voxels_painted_between_clicks_are_kept(scene, stub_engine):
    # Old code: the second click wrote mask | keep(session start) over its region and erased
    # the painted voxels (all of them here).
    logic = _logic(scene, stub_engine)
    _click_ijk(logic, scene, (20, 18, 15))
    before_paint = scene.segment(scene.target)
    painted = _paint(scene, scene.target, (slice(15, 18), slice(19, 22), slice(24, 27)))
    assert not (painted & before_paint).any()  # all 27 are new voxels
    record = _click_ijk(logic, scene, (22, 19, 16))
    inside = np.zeros(scene.shape, bool)
    inside[record.region] = True
    assert (painted & inside).sum() == 27  # the second write covered them all
    assert record.outside_edits >= 27
    assert scene.segment(scene.target)[painted].all()
    # What the replay relies on: the (bit-packed) segment right after each write.
    np.testing.assert_array_equal(record.undo.after, scene.segment(scene.target)[record.region])
    assert record.undo.after_bits.nbytes * 8 < record.undo.after.size + 8
    # A third click far off (a new region that does not cover them) leaves them too.
    _click_ijk(logic, scene, (21, 17, 15))
    assert scene.segment(scene.target)[painted].all()


def test_m2_voxels_erased_between_clicks_stay_erased_and_negative_clicks_still_work(
    scene, stub_engine
):
    logic = _logic(scene, stub_engine)
    _click_ijk(logic, scene, (20, 18, 15))
    before = scene.segment(scene.target)
    erased_block = (slice(14, 17), slice(17, 20), slice(19, 22))  # part of the first sphere
    _paint(scene, scene.target, erased_block, value=False)
    erased = before & ~scene.segment(scene.target)
    assert erased.sum() > 5
    painted = _paint(scene, scene.target, (slice(15, 18), slice(14, 16), slice(15, 18)))
    painted &= ~before
    _click_ijk(logic, scene, (20, 19, 15))  # its sphere covers the erased voxels again
    after = scene.segment(scene.target)
    assert not after[erased].any()  # the user's erasure is kept
    assert after[painted].all()
    # A negative click removes predicted voxels but never the user's painted ones.
    _click_ijk(logic, scene, (16, 15, 16), positive=False)
    after = scene.segment(scene.target)
    assert after[painted].all()
    assert not after[15, 15, 16] or painted[15, 15, 16]


def test_m2_undo_keeps_edits_made_after_the_undone_click(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    _click_ijk(logic, scene, (20, 18, 15))
    clicked = scene.segment(scene.target)
    painted = _paint(scene, scene.target, (slice(15, 18), slice(19, 22), slice(22, 25)))
    painted &= ~clicked  # voxels the paint changed (painting over the click changes nothing)
    assert painted.sum() > 10
    assert logic.undo() is not None
    after = scene.segment(scene.target)
    assert after[painted].all()  # undo took back the click, not the paint
    assert after.sum() == painted.sum()


def _hold_worker(logic) -> threading.Event:
    gate = threading.Event()
    logic.worker.submit(gate.wait)
    return gate


def test_m3_prompts_while_pending_never_raise_new_segment_and_changed_volume(scene, stub_engine):
    # Old code: the first prompt of another segment (or after the volume changed) while one
    # was pending raised RuntimeError("cannot rebuild a session while predictions are pending").
    logic = _logic(scene, stub_engine)
    gate = _hold_worker(logic)
    logic.add_point(scene.world_of_ijk((20, 18, 15)))
    logic.set_target(scene.volume, scene.segmentation, scene.other)
    logic.add_point(scene.world_of_ijk((30, 30, 25)))  # a new segment's session, queued
    scene.volume.GetImageData().Modified()  # the volume changed: the session is rebuilt
    logic.add_point(scene.world_of_ijk((31, 30, 25)))
    assert logic.pending_count() == 3
    gate.set()
    records = _wait_ok(logic)
    assert [type(r) for r in records] == [EditRecord] * 3
    assert scene.segment(scene.target)[15, 18, 20] and scene.segment(scene.other)[25, 30, 30]
    assert len(stub_engine.sessions) == 3


def _closed_and_rebuilt(scene):
    """Close the scene (as File > Close Scene does) and load similar data: same node IDs."""
    scene.scene.Clear(0)
    new = build_scene(mrml_scene=scene.scene)
    assert new.volume.GetID() == scene.volume.GetID()
    assert new.segmentation.GetID() == scene.segmentation.GetID() and new.target == scene.target
    return new


@pytest.mark.parametrize("widget_forgets", [True, False], ids=["forget_sessions", "nodes-only"])
def test_m8_result_for_a_closed_scene_is_dropped_not_written_into_the_new_one(
    scene, stub_engine, widget_forgets
):
    # Old code: forget_sessions raised while busy (the Widget then kept the sessions) and the
    # stale result was written into the new scene's nodes that reuse the old IDs.
    logic = _logic(scene, stub_engine)
    gate = _hold_worker(logic)
    logic.add_point(scene.world_of_ijk((20, 18, 15)))
    new = _closed_and_rebuilt(scene)
    if widget_forgets:
        logic.forget_sessions()  # the Widget's onSceneClose; must not raise while busy
    logic.set_target(new.volume, new.segmentation, new.target)
    logic.add_point(new.world_of_ijk((10, 30, 25)))  # a click in the new scene meanwhile
    gate.set()
    stale, fresh = logic.wait()
    assert isinstance(stale, FailedEdit) and isinstance(stale.error, StaleResultError)
    assert "nothing was written" in str(stale.error)
    assert isinstance(fresh, EditRecord)
    seg = new.segment(new.target)
    assert not seg[15, 18, 20] and seg[25, 30, 10]
    assert len(stub_engine.sessions) == 2  # the new scene got its own session


def test_m1_engine_change_while_busy_waits_for_the_work_in_flight(scene, stub_engine):
    from slicer_scene import StubEngine

    logic = _logic(scene, stub_engine)
    _click_ijk(logic, scene, (20, 18, 15))
    gate = _hold_worker(logic)
    logic.add_point(scene.world_of_ijk((21, 18, 15)))
    new_engine = StubEngine()
    assert logic.set_engine(new_engine) is False and logic.engine_change_pending
    assert logic.engine is stub_engine
    gate.set()
    (record,) = _wait_ok(logic)  # the in-flight prompt finished on the old network
    assert isinstance(record, EditRecord) and logic.engine is new_engine
    assert not logic.engine_change_pending
    assert any("model changed" in n for n in logic.notices())
    _click_ijk(logic, scene, (22, 18, 15))
    assert len(new_engine.sessions) == 1 and len(stub_engine.sessions) == 1


def test_m8_sessions_are_evicted_by_memory_idle_without_history_first_and_reported(
    scene, stub_engine
):
    # Old code: the 5th segment silently dropped the least recently used session with its
    # undo history. Now the bound is memory (here: room for two volume copies).
    per_session = int(np.prod(scene.shape)) * 4
    logic = InteractiveLogic(stub_engine, memory_budget=2 * per_session)
    seg = scene.segmentation.GetSegmentation()
    third, fourth = seg.AddEmptySegment("third", "third"), seg.AddEmptySegment("fourth", "fourth")

    def click(segment_id, ijk):
        logic.set_target(scene.volume, scene.segmentation, segment_id)
        _click_ijk(logic, scene, ijk)

    click(scene.target, (20, 18, 15))
    click(scene.other, (30, 30, 25))
    logic.undo()  # 'other' keeps a session but no history
    click(third, (10, 30, 25))  # over the limit: 'other' goes (no history), not 'target'
    assert logic.notices() == []
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    assert logic.can_undo()
    click(fourth, (12, 30, 25))  # now one with history must go: the oldest, reported
    (notice,) = logic.notices()
    assert repr(scene.target) in notice and "dropped" in notice
    assert len(logic._sessions) == 2
