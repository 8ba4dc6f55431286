"""Nothing the user has is lost (review M1, M2, M3, M8, m1, m8): real MRML (slicer-core),
with the deterministic SphereSession so that every voxel's fate is known.

Each test fails on the code before its fix (said per test).
"""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from slicer_scene import _oriented, build_scene, slicer

from FastSAM3DSlicerLib import mrml
from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic


def _wait_ok(logic):
    out = logic.wait()
    for r in out:
        if isinstance(r, FailedEdit):
            raise r.error
    return out


def _image_to_seg(scene) -> np.ndarray:
    return mrml.SegmentWriter(scene.segmentation, scene.volume).image_to_segmentation()


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
        _oriented(_image_to_seg(scene), modifier), scene.segmentation, segment_id, mode)
    assert ok
    return mask


def _local_value(scene, segment_id, ijk) -> bool:
    """Independent of our reader: the segment's labelmap in its own frame, looked up at the
    volume voxel ``ijk`` mapped into that frame."""
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        scene.segmentation, segment_id, labelmap, False)
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
    # A third click far off (a new region that does not cover them) leaves them too.
    _click_ijk(logic, scene, (21, 17, 15))
    assert scene.segment(scene.target)[painted].all()


def test_m2_voxels_erased_between_clicks_stay_erased_and_negative_clicks_still_work(
        scene, stub_engine):
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
