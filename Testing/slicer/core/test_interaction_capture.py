"""Prompt capture (Lib/interaction.py) on real slice nodes: gestures, pixels to RAS, box depth.

The Widget only forwards Qt mouse events of the slice views; these tests drive the same calls
with a real vtkMRMLSliceNode (slicer-core), so what a click or a drag becomes is proven here.
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_scene import rotation, slicer

from FastSAM3DSlicerLib import interaction, mrml
from FastSAM3DSlicerLib.interaction import BoxPrompt, PointPrompt, PromptCapture
from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic

DIMS = (400, 300)  # view pixels
FOV = (200.0, 150.0)  # mm: 0.5 mm per pixel


def slice_node(axes: np.ndarray, center=(10.0, -20.0, 30.0)):
    """A slice view whose in-plane x, y and normal are the rows of ``axes``, through ``center``."""
    node = slicer.vtkMRMLSliceNode()
    node.SetDimensions(DIMS[0], DIMS[1], 1)
    node.SetFieldOfView(FOV[0], FOV[1], 1.0)
    m = node.GetSliceToRAS()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(axes[c][r]))
        m.SetElement(r, 3, float(center[r]))
    node.UpdateMatrices()
    return node


AXIAL = np.eye(3)
CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
SAGITTAL = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)
OBLIQUE = (rotation("z", 20) @ rotation("x", 35)).T  # rows: rotated axes
ORIENTATIONS = {"axial": AXIAL, "coronal": CORONAL, "sagittal": SAGITTAL, "oblique": OBLIQUE}


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_view_pixels_map_to_world_through_the_slice_plane(name):
    axes = ORIENTATIONS[name]
    center = np.array([10.0, -20.0, 30.0])
    node = slice_node(axes, center)
    # The view's centre pixel is the slice centre; 10 px right / 6 px up move 5 / 3 mm along
    # the slice's own x / y axes (0.5 mm per pixel), and every pixel lies on the slice plane.
    mid = (DIMS[0] / 2, DIMS[1] / 2)
    np.testing.assert_allclose(interaction.xy_to_ras(node, mid), center, atol=1e-9)
    moved = interaction.xy_to_ras(node, (mid[0] + 10, mid[1] + 6))
    np.testing.assert_allclose(moved, center + 5 * axes[0] + 3 * axes[1], atol=1e-9)
    np.testing.assert_allclose(interaction.slice_axes(node), axes, atol=1e-12)


def test_qt_to_display_flips_y_and_scales_by_pixel_ratio():
    assert interaction.display_xy(10, 20, view_height=300) == (10.0, 280.0)
    assert interaction.display_xy(10, 20, view_height=300, pixel_ratio=2.0) == (20.0, 560.0)


def test_click_is_a_point_at_the_press_with_the_current_polarity():
    node = slice_node(OBLIQUE)
    capture = PromptCapture(threshold_px=5)
    assert not capture.press("Red", (100, 100))  # not prompting: the view keeps the event
    assert capture.release("Red", (100, 100), node) is None

    capture.start(positive=False)
    assert capture.press("Red", (100, 100))
    assert capture.move("Red", (102, 103)) is None  # jitter below the threshold: no box
    prompt = capture.release("Red", (103, 102), node)
    assert isinstance(prompt, PointPrompt) and prompt.positive is False
    np.testing.assert_allclose(prompt.world, interaction.xy_to_ras(node, (100, 100)))
    assert capture.toggle_polarity() is True
    capture.press("Red", (50, 60))
    assert capture.release("Red", (50, 60), node).positive is True


def test_drag_is_a_box_with_a_live_outline_and_the_documented_depth():
    node = slice_node(OBLIQUE)
    capture = PromptCapture(threshold_px=5)
    capture.start()
    capture.press("Yellow", (100, 100))
    assert capture.move("Yellow", (160, 100)) == ((100.0, 100.0), (160.0, 100.0))
    assert capture.dragging
    assert capture.move("Green", (170, 100)) is None  # another view's events are not ours
    # Back within the threshold after a drag: still a box (the user meant one).
    prompt = capture.release("Yellow", (180, 140), node)
    assert isinstance(prompt, BoxPrompt) and not capture.dragging
    box = prompt.box
    # 80 x 40 px at 0.5 mm = 40 x 20 mm in-plane; depth = the larger side (40 mm).
    np.testing.assert_allclose(box.size, (40.0, 20.0, 40.0), atol=1e-9)
    p0 = interaction.xy_to_ras(node, (100, 100))
    p1 = interaction.xy_to_ras(node, (180, 140))
    np.testing.assert_allclose(box.center, (p0 + p1) / 2, atol=1e-9)  # centred on the slice
    corners = box.corners()
    normal = OBLIQUE[2]
    depth = (corners - box.center) @ normal
    np.testing.assert_allclose(sorted(set(np.round(depth, 9))), (-20.0, 20.0))
    # The dragged corners are corners of the box's mid-plane section.
    for p in (p0, p1):
        d = np.linalg.norm(corners - p, axis=1)
        assert np.isclose(np.sort(d)[0], 20.0)  # 20 mm straight through-plane from a corner


def test_press_release_in_different_views_or_cancel_give_nothing():
    node = slice_node(AXIAL)
    capture = PromptCapture()
    capture.start()
    capture.press("Red", (10, 10))
    assert capture.release("Green", (10, 10), node) is None
    capture.press("Red", (10, 10))
    capture.cancel()
    assert capture.release("Red", (10, 10), node) is None
    capture.press("Red", (10, 10))
    capture.stop()
    assert capture.release("Red", (10, 10), node) is None


def test_threshold_scales_with_the_device_pixel_ratio():
    capture = PromptCapture(threshold_px=5)
    capture.start()
    capture.press("Red", (0, 0), pixel_ratio=2.0)
    assert capture.move("Red", (8, 0)) is None  # 8 device px < 10 = 5 logical px at 2x
    assert capture.move("Red", (10, 0)) is not None


def test_zero_area_drag_is_refused_with_a_message():
    node = slice_node(AXIAL)
    with pytest.raises(ValueError, match="no area"):
        interaction.box_from_drag(node, (10, 10), (60, 10))


def test_roi_shows_exactly_the_box_drawn(scene):
    node = slice_node(OBLIQUE)
    box = interaction.box_from_drag(node, (120, 80), (200, 180))
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    interaction.set_roi_from_box(roi, box)
    got = mrml.roi_corners_world(roi)
    want = box.corners()
    assert all(np.min(np.linalg.norm(got - c, axis=1)) < 1e-6 for c in want)


def test_box_reaches_the_session_with_its_depth(scene, stub_engine):
    """A drag on a slice through the volume: the session gets the box's bounds, depth kept."""
    center = scene.world_of_ijk((22, 20, 18))
    node = slice_node(AXIAL, center)
    box = interaction.box_from_drag(node, (190, 140), (210, 170))  # 10 x 15 mm
    assert box.size[2] == 15.0
    logic = InteractiveLogic(stub_engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    logic.add_box(box.corners(), tag="box")
    (record,) = logic.wait()
    assert not isinstance(record, FailedEdit), record
    kind, lo, hi = stub_engine.sessions[0].calls[0]
    assert kind == "box"
    corners = np.array([mrml.world_to_volume_ras(scene.volume, c) for c in box.corners()])
    np.testing.assert_allclose(lo, corners.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(hi, corners.max(axis=0), atol=1e-6)


def test_refusal_and_progress_text():
    assert interaction.refusal(0) is None
    assert interaction.refusal(interaction.MAX_QUEUED_PROMPTS - 1) is None
    assert "not placed" in interaction.refusal(interaction.MAX_QUEUED_PROMPTS)
    assert interaction.progress_text(1, 0.2) == "Predicting..."
    assert interaction.progress_text(3, 4.7) == "Predicting... 4 s (2 more queued)"
