"""The Lib's MRML logic on real Slicer MRML (slicer-core), driven by a deterministic session.

These tests use SphereSession (conftest): a stand-in with fastsam3d.Session's API whose result
is a known sphere around the click. That makes "the selected segment holds voxels at the
clicked world position" checkable, which the fixture-weight network (arbitrary output) cannot
do. test_slicer_real_session.py runs the same path with the real fastsam3d.Session.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import vtk
from slicer_scene import build_scene, slicer

from FastSAM3DSlicerLib import geometry, mrml, segment_writer
from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic, NoTargetError, thicken_box


def _logic(scene, engine, editor=None) -> InteractiveLogic:
    logic = InteractiveLogic(engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target, editor)
    return logic


def _click(logic, scene, world, positive=True):
    idx = scene.add_point_world(world)
    logic.add_point(world, positive, tag=(scene.points.GetID(), idx))
    (record,) = logic.wait()
    if isinstance(record, FailedEdit):
        raise record.error
    return record


def test_click_writes_sphere_at_world_position_only_inside_region(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    ijk = (20, 18, 15)  # (i, j, k), away from the other segment
    world = scene.world_of_ijk(ijk)
    before_target = scene.segment(scene.target)
    before_other = scene.segment(scene.other)
    assert not before_target.any()

    record = _click(logic, scene, world)

    # The stub saw the click in the volume's own RAS (parent transform undone).
    ((kind, ras, positive),) = stub_engine.sessions[0].calls
    np.testing.assert_allclose(ras, (scene.ijk_to_ras @ np.array([*ijk, 1.0]))[:3], atol=1e-6)
    assert scene.segment_value_at_world(scene.target, world)
    after = scene.segment(scene.target)
    assert after[ijk[2], ijk[1], ijk[0]]
    inside = np.zeros(scene.shape, bool)
    inside[record.region] = True
    # Everything outside the result's region is untouched, and the region holds the sphere.
    np.testing.assert_array_equal(after[~inside], before_target[~inside])
    assert after[inside].sum() == record.voxels > 0
    np.testing.assert_array_equal(scene.segment(scene.other), before_other)
    assert logic.last_edit is record


def test_undo_restores_previous_labelmap_and_steps_session_back(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    w1 = scene.world_of_ijk((20, 18, 15))
    w2 = scene.world_of_ijk((24, 20, 17))
    _click(logic, scene, w1)
    after_first = scene.segment(scene.target)
    _click(logic, scene, w2)
    assert not np.array_equal(scene.segment(scene.target), after_first)
    prompt = logic.undo()
    assert prompt.tag[1] == 1  # the Widget removes this marker
    np.testing.assert_array_equal(scene.segment(scene.target), after_first)
    logic.undo()
    assert not scene.segment(scene.target).any()
    assert logic.undo() is None
    assert [c[0] for c in stub_engine.sessions[0].calls] == ["point", "point", "undo", "undo"]


def test_negative_click_removes_only_session_voxels_and_keeps_earlier_work(scene, stub_engine):
    # Voxels painted before the session started must survive a negative click on them.
    painted = np.zeros(scene.shape, bool)
    painted[15, 18, 19:22] = True
    from slicer_scene import _oriented

    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _oriented(scene.to_world @ scene.ijk_to_ras, painted),
        scene.segmentation,
        scene.target,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
    )
    logic = _logic(scene, stub_engine)
    world = scene.world_of_ijk((20, 18, 15))
    _click(logic, scene, world)
    _click(logic, scene, world, positive=False)
    np.testing.assert_array_equal(scene.segment(scene.target), painted)


def test_overwrite_all_takes_voxels_from_other_segment_and_undo_gives_them_back(stub_engine):
    scene = build_scene(other_block=(slice(12, 18), slice(15, 21), slice(17, 23)))
    logic = _logic(scene, stub_engine)  # no editor node: Slicer defaults (overwrite all)
    before_other = scene.segment(scene.other)
    world = scene.world_of_ijk((20, 18, 15))
    record = _click(logic, scene, world)
    target = scene.segment(scene.target)
    other = scene.segment(scene.other)
    assert not (target & other).any()
    lost = before_other & ~other
    assert lost.any() and (lost <= target).all()  # lost only where the target grew
    outside = np.ones(scene.shape, bool)
    outside[record.region] = False
    np.testing.assert_array_equal(other[outside], before_other[outside])
    logic.undo()
    np.testing.assert_array_equal(scene.segment(scene.other), before_other)
    assert not scene.segment(scene.target).any()


@pytest.mark.parametrize("mode", ["EditAllowedOutsideAllSegments", "OverwriteNone"])
def test_masked_out_area_stays_untouched(stub_engine, mode):
    scene = build_scene(other_block=(slice(12, 18), slice(15, 21), slice(17, 23)))
    editor = slicer.vtkMRMLSegmentEditorNode()
    scene.scene.AddNode(editor)
    if mode == "OverwriteNone":
        editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    else:
        editor.SetMaskMode(getattr(slicer.vtkMRMLSegmentationNode, mode))
    logic = _logic(scene, stub_engine, editor)
    before_other = scene.segment(scene.other)
    _click(logic, scene, scene.world_of_ijk((20, 18, 15)))
    target = scene.segment(scene.target)
    np.testing.assert_array_equal(scene.segment(scene.other), before_other)
    assert target.any()
    if mode == "EditAllowedOutsideAllSegments":
        assert not (target & before_other).any()  # the other segment's voxels were not editable
    else:
        assert (target & before_other).any()  # overlap allowed, other segment kept


def test_intensity_range_mask_limits_the_edit(scene, stub_engine):
    editor = slicer.vtkMRMLSegmentEditorNode()
    scene.scene.AddNode(editor)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(200, 1000)  # only the bright blob is editable
    logic = _logic(scene, stub_engine, editor)
    from FastSAM3DSlicerLib import mrml

    array = mrml.volume_array(scene.volume)
    # A click on the blob's edge: the sphere spills into the dark background.
    edge = (22 + 11 - 1, 20, 18)  # (i, j, k): just inside the blob along i
    record = _click(logic, scene, scene.world_of_ijk(edge))
    target = scene.segment(scene.target)
    assert target.any()
    assert (array[target] >= 200).all()
    assert record.voxels > target.sum()  # the stub's sphere was cut by the intensity mask


def test_prompt_outside_volume_is_refused_without_touching_anything(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    outside = scene.world_of_ijk((-5, 10, 10))
    with pytest.raises(geometry.PromptOutsideVolumeError, match="outside the volume"):
        logic.add_point(outside, True)
    assert not logic.busy
    logic.worker.call(lambda: None)  # the session is built on the worker: let it finish
    assert stub_engine.sessions[0].calls == []
    far = np.array([scene.world_of_ijk((200, 200, 200))] * 8) + np.arange(8)[:, None]
    with pytest.raises(geometry.PromptOutsideVolumeError, match="box"):
        logic.add_box(far)


def test_one_session_per_segment_and_sessions_resume(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    _click(logic, scene, scene.world_of_ijk((20, 18, 15)))
    logic.set_target(scene.volume, scene.segmentation, scene.other)
    _click(logic, scene, scene.world_of_ijk((30, 25, 20)))
    assert len(stub_engine.sessions) == 2
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    assert len(logic.prompts()) == 1
    logic.undo()
    assert not scene.segment(scene.target).any()
    assert scene.segment(scene.other)[20, 25, 30]


def test_roi_box_goes_to_session_in_volume_ras(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.scene.AddNode(roi)
    center = scene.world_of_ijk((20, 18, 15))
    roi.SetCenterWorld(*center) if hasattr(roi, "SetCenterWorld") else roi.SetCenter(*center)
    roi.SetSize(10, 8, 6)
    logic.add_roi(roi)
    (record,) = logic.wait()
    assert not isinstance(record, FailedEdit), record
    kind, lo, hi = stub_engine.sessions[0].calls[0]
    assert kind == "box"
    vol_center = (scene.ijk_to_ras @ np.array([20, 18, 15, 1.0]))[:3]
    np.testing.assert_allclose((np.array(lo) + np.array(hi)) / 2, vol_center, atol=1e-6)
    assert scene.segment_value_at_world(scene.target, center)


def test_hardened_transform_gives_the_same_result(stub_engine):
    a = build_scene()
    b = build_scene()
    b.volume.SetAndObserveTransformNodeID(None)
    b.volume.ApplyTransformMatrix(b.transform.GetMatrixTransformToParent())  # harden
    world = a.world_of_ijk((20, 18, 15))
    ra = _click(_logic(a, stub_engine), a, world)
    rb = _click(_logic(b, stub_engine), b, world)
    assert ra.region == rb.region
    np.testing.assert_array_equal(a.segment(a.target), b.segment(b.target))
    assert b.segment_value_at_world(b.target, world)


@pytest.mark.parametrize("orientation", ["Axial", "Coronal", "Sagittal"])
def test_click_on_each_slice_view_lands_on_its_voxel(scene, stub_engine, orientation):
    # A click on a slice view is a pixel (x, y) mapped by the slice's XYToRAS: do the same.
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene.scene)
    view = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetDimensions(400, 300, 1)
    view.SetFieldOfView(200.0, 150.0, 1.0)
    view.SetOrientation(orientation)
    target = scene.world_of_ijk((22, 17, 14))
    view.JumpSliceByCentering(*target)
    view.UpdateMatrices()
    xy_to_ras = mrml.matrix_to_numpy(view.GetXYToRAS())
    x, y = np.round((np.linalg.inv(xy_to_ras) @ np.array([*target, 1.0]))[:2])
    world = (xy_to_ras @ np.array([x, y, 0.0, 1.0]))[:3]
    i, j, k = np.round(np.linalg.inv(scene.to_world @ scene.ijk_to_ras) @ np.array([*world, 1.0]))[
        :3
    ].astype(int)
    logic = _logic(scene, stub_engine)
    _click(logic, scene, world)
    ((_, ras, _),) = stub_engine.sessions[0].calls
    np.testing.assert_allclose(
        ras, (np.linalg.inv(scene.to_world) @ np.array([*world, 1.0]))[:3], atol=1e-6
    )
    assert scene.segment(scene.target)[k, j, i]
    assert scene.segment_value_at_world(scene.target, world)


def test_inference_runs_on_one_persistent_thread(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    seen = set()
    session_cls = type(stub_engine.new_session())
    orig = session_cls.add_point

    def spy(self, ras, positive=True):
        seen.add(threading.get_ident())
        return orig(self, ras, positive)

    session_cls.add_point = spy
    try:
        for n in range(3):
            _click(logic, scene, scene.world_of_ijk((18 + n, 18, 15)))
    finally:
        session_cls.add_point = orig
    assert seen == {logic.worker.thread_id}
    assert threading.get_ident() not in seen


def test_no_target_gives_a_clear_message(stub_engine):
    logic = InteractiveLogic(stub_engine)
    with pytest.raises(NoTargetError, match="Select a volume"):
        logic.add_point((0, 0, 0), True)


def test_flat_box_gets_depth_and_a_real_box_is_kept():
    lo, hi = thicken_box(np.array([0.0, 0.0, 5.0]), np.array([40.0, 20.0, 5.5]))
    np.testing.assert_allclose(lo, [0, 0, 5.25 - 20])
    np.testing.assert_allclose(hi, [40, 20, 5.25 + 20])
    lo, hi = thicken_box(np.array([0.0, 0.0, 0.0]), np.array([40.0, 20.0, 15.0]))
    np.testing.assert_allclose(hi - lo, [40, 20, 15])


def test_failed_prediction_is_reported_and_not_kept(scene, stub_engine):
    logic = _logic(scene, stub_engine)
    _click(logic, scene, scene.world_of_ijk((20, 18, 15)))
    after_first = scene.segment(scene.target)
    session = stub_engine.sessions[0]

    def boom(ras, positive=True):
        raise RuntimeError("CUDA out of memory")

    session.add_point = boom
    logic.add_point(scene.world_of_ijk((24, 20, 17)), True, tag="second")
    (failed,) = logic.wait()
    assert isinstance(failed, FailedEdit) and failed.prompt.tag == "second"
    assert "out of memory" in str(failed.error)
    np.testing.assert_array_equal(scene.segment(scene.target), after_first)
    assert len(logic.prompts()) == 1


def test_non_linear_transform_between_volume_and_segmentation_is_refused_up_front(
    scene, stub_engine
):
    grid = slicer.vtkMRMLGridTransformNode()
    scene.scene.AddNode(grid)
    displacement = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.SetSpacing(50.0, 50.0, 50.0)
    field.SetOrigin(-75.0, -75.0, -75.0)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(1.5)
    displacement.SetDisplacementGridData(field)
    grid.SetAndObserveTransformToParent(displacement)
    scene.segmentation.SetAndObserveTransformNodeID(grid.GetID())
    logic = _logic(scene, stub_engine)
    with pytest.raises(segment_writer.GeometryError, match="non-linear"):
        logic.add_point(scene.world_of_ijk((20, 18, 15)), True)
    assert not logic.busy


def test_points_go_through_a_non_linear_volume_transform(scene, stub_engine):
    # Volume under (linear o grid) transforms, segmentation under the same: points must be
    # mapped through the inverse of the non-linear chain; writing stays volume-aligned.
    grid = slicer.vtkMRMLGridTransformNode()
    scene.scene.AddNode(grid)
    displacement = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(5, 5, 5)
    field.SetSpacing(60.0, 60.0, 60.0)
    field.SetOrigin(-120.0, -120.0, -120.0)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(4.0)  # a 4 mm shift along every axis
    displacement.SetDisplacementGridData(field)
    grid.SetAndObserveTransformToParent(displacement)
    scene.transform.SetAndObserveTransformNodeID(grid.GetID())
    scene.segmentation.SetAndObserveTransformNodeID(scene.transform.GetID())
    logic = _logic(scene, stub_engine)
    ijk = (20, 18, 15)
    world = scene.world_of_ijk(ijk) + 4.0  # the grid moves everything by +4 mm
    _click(logic, scene, world)
    ((_, ras, _),) = stub_engine.sessions[0].calls
    np.testing.assert_allclose(ras, (scene.ijk_to_ras @ np.array([*ijk, 1.0]))[:3], atol=1e-3)
    assert scene.segment(scene.target)[ijk[2], ijk[1], ijk[0]]


@pytest.mark.parametrize("overwrite", ["OverwriteAllSegments", "OverwriteNone"])
def test_in_place_writes_equal_slicers_own_writes(overwrite):
    # The fast path writes into the layer directly; Slicer's SetBinaryLabelmapToSegment is the
    # reference. The same random overlapping writes to both segments must end identical, and
    # undoing them all must restore the start, in both modes.
    rng = np.random.default_rng(1)
    steps = [(rng.integers(0, 12, 3), rng.random((14, 14, 14)) < 0.5, n % 2) for n in range(6)]
    settings = segment_writer.MaskingSettings(
        overwrite_mode=getattr(slicer.vtkMRMLSegmentEditorNode, overwrite)
    )
    finals = []
    for in_place in (True, False):
        scene = build_scene(other_block=(slice(5, 25), slice(5, 25), slice(5, 25)))
        start = (scene.segment(scene.target), scene.segment(scene.other))
        writer = segment_writer.SegmentWriter(scene.segmentation, scene.volume)
        writer.allow_in_place = in_place
        fast_writes = []
        original = writer._write_in_place

        def counting(*args, original=original, fast_writes=fast_writes):
            done = original(*args)
            fast_writes.append(done)
            return done

        writer._write_in_place = counting
        entries = []
        for lo, mask, which in steps:
            region = tuple(slice(int(a), int(a) + 14) for a in lo)
            segment = (scene.target, scene.other)[which]
            entries.append(writer.write(segment, region, mask, settings))
        finals.append((scene.segment(scene.target), scene.segment(scene.other)))
        assert any(fast_writes) == in_place  # the fast path really ran (or really did not)
        for entry in reversed(entries):
            writer.restore(entry)
        for now, before in zip((scene.segment(scene.target), scene.segment(scene.other)), start):
            np.testing.assert_array_equal(now, before)
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)
    assert finals[0][0].any() and finals[0][1].any()


def test_in_place_write_notifies_the_segmentation(scene):
    writer = segment_writer.SegmentWriter(scene.segmentation, scene.volume)
    region = (slice(10, 20), slice(10, 20), slice(10, 20))
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    writer.write(scene.target, region, mask)  # first write allocates the layer (Slicer path)
    events = []
    segmentation = scene.segmentation.GetSegmentation()
    tag = segmentation.AddObserver(
        slicer.vtkSegmentation.SourceRepresentationModified,
        lambda caller, event: events.append(event),
    )
    inner = mask[2:8, 2:8, 2:8].copy()  # inside the layer Slicer allocated (no growth)
    inner[2, 2, 2] = False
    inner[0, 1, 2] = False
    assert writer._write_in_place(
        scene.target, writer.image_to_segmentation(), (12, 17, 12, 17, 12, 17), inner
    )
    segmentation.RemoveObserver(tag)
    assert events, "display and derived representations would not update"
    after = scene.segment(scene.target)
    assert not after[14, 14, 14] and not after[12, 13, 14] and after[13, 13, 13]


@pytest.mark.parametrize("grow", [False, True], ids=["in-layer", "layer-grows"])
def test_in_place_write_rebuilds_only_the_edited_segments_surface(grow):
    # Old code: layer.Modified() made vtkSegmentation drop every segment's closed surface
    # (with Show 3D on, each click rebuilt them all; review m12).
    scene = build_scene()
    seg = scene.segmentation.GetSegmentation()
    closed = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    writers = []
    for in_place in (True, False):
        s = build_scene() if not in_place else scene
        w = segment_writer.SegmentWriter(s.segmentation, s.volume)
        w.allow_in_place = False
        w.write(s.target, (slice(20, 26),) * 3, np.ones((6, 6, 6), bool))
        s.segmentation.CreateClosedSurfaceRepresentation()
        w.allow_in_place = in_place
        writers.append((s, w))
    other_surface = seg.GetSegment(scene.other).GetRepresentation(closed)
    region = (slice(10, 27),) * 3 if grow else (slice(21, 26),) * 3
    shape = tuple(r.stop - r.start for r in region)
    mask = np.ones(shape, bool)
    mask[1, 1, 1] = False
    points = []
    for s, w in writers:
        w.write(s.target, region, mask)
        target = s.segmentation.GetSegmentation().GetSegment(s.target)
        points.append(target.GetRepresentation(closed).GetNumberOfPoints())
    # The other segment keeps its very surface; the edited one's equals Slicer's own rebuild.
    assert seg.GetSegment(scene.other).GetRepresentation(closed) is other_surface
    assert points[0] == points[1] > 0
    np.testing.assert_array_equal(scene.segment(scene.target), writers[1][0].segment(scene.target))


def test_session_set_up_runs_on_the_worker_without_blocking_the_caller(scene, stub_engine):
    release = threading.Event()
    original = stub_engine.new_session

    def slow_new_session():
        assert release.wait(10), "add_point waited for the session set-up"
        return original()

    stub_engine.new_session = slow_new_session
    logic = _logic(scene, stub_engine)
    pending = logic.add_point(scene.world_of_ijk((20, 18, 15)), True)
    assert not pending.future.done() and logic.busy  # returned while set-up is still running
    release.set()
    (record,) = logic.wait()
    assert not isinstance(record, FailedEdit), record
    assert scene.segment(scene.target).any()


def test_failed_session_set_up_is_reported_and_retried(scene, stub_engine):
    original = stub_engine.new_session
    calls = []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("volume is constant (every voxel is 0): nothing to segment")
        return original()

    stub_engine.new_session = failing_once
    logic = _logic(scene, stub_engine)
    logic.add_point(scene.world_of_ijk((20, 18, 15)), True, tag="first")
    (failed,) = logic.wait()
    assert isinstance(failed, FailedEdit) and "constant" in str(failed.error)
    assert not scene.segment(scene.target).any()
    record = _click(logic, scene, scene.world_of_ijk((20, 18, 15)))
    assert record.voxels > 0 and len(calls) == 2
