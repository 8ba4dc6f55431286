"""Settings and targets of the FastSAM3D panel (Lib/params.py, Lib/interaction.py) on real MRML.

- Masking is the Segment Editor module's own parameter node (singleton tag ``SegmentEditor``):
  what the panel writes is what the Lib's writer reads and what the Segment Editor shows.
- Preferences (weights, device, polarity) survive in a key/value store.
- A prompt with no segmentation or segment selected creates them.
"""

from __future__ import annotations

import pytest
from slicer_scene import slicer

from FastSAM3DSlicerLib import interaction, params, segment_writer

SEG = slicer.vtkMRMLSegmentationNode


def test_editor_node_is_the_segment_editor_modules_singleton(scene):
    """M4: a node the Segment Editor module created is the one FastSAM3D uses (and back)."""
    theirs = slicer.vtkMRMLSegmentEditorNode()
    theirs.SetSingletonTag("SegmentEditor")
    theirs = scene.scene.AddNode(theirs)
    theirs.SetOverwriteMode(theirs.OverwriteNone)
    ours = params.segment_editor_node(scene.scene)
    assert ours is theirs
    assert (
        segment_writer.MaskingSettings.from_segment_editor_node(ours).overwrite_mode
        == ours.OverwriteNone
    )


def test_editor_node_is_created_once_when_missing(scene):
    first = params.segment_editor_node(scene.scene)
    assert first.GetSingletonTag() == "SegmentEditor"
    assert params.segment_editor_node(scene.scene) is first
    assert scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1


def test_editable_area_choices_round_trip_through_the_node(scene):
    node = params.segment_editor_node(scene.scene)
    choices = params.editable_area_choices(scene.segmentation)
    labels = [c.label for c in choices]
    assert labels[:5] == [
        "Everywhere",
        "Inside all segments",
        "Inside all visible segments",
        "Outside all segments",
        "Outside all visible segments",
    ]
    assert labels[5:] == ["Inside target", "Inside other"]
    for n, choice in enumerate(choices):
        params.set_editable_area(node, choice)
        assert params.current_area_index(choices, node) == n
        settings = segment_writer.MaskingSettings.from_segment_editor_node(node)
        assert settings.mask_mode == choice.mode
    assert settings.mask_mode == SEG.EditAllowedInsideSingleSegment
    assert settings.mask_segment_id == scene.other
    # A mask segment that no longer exists is not silently shown as another choice.
    scene.segmentation.GetSegmentation().RemoveSegment(scene.other)
    assert params.current_area_index(params.editable_area_choices(scene.segmentation), node) == -1
    assert len(params.editable_area_choices(None)) == 5


def test_overwrite_and_intensity_settings_reach_the_writer(scene):
    node = params.segment_editor_node(scene.scene)
    for index in range(len(params.OVERWRITE_MODES)):
        params.set_overwrite_index(node, index)
        assert params.overwrite_index(node) == index
    assert (
        segment_writer.MaskingSettings.from_segment_editor_node(node).overwrite_mode
        == node.OverwriteNone
    )
    params.set_intensity_mask(node, True, 100.0, 250.0)
    settings = segment_writer.MaskingSettings.from_segment_editor_node(node)
    assert settings.intensity_mask and settings.intensity_range == (100.0, 250.0)
    with pytest.raises(ValueError, match="empty"):
        params.set_intensity_mask(node, True, 300.0, 250.0)
    assert segment_writer.MaskingSettings.from_segment_editor_node(node).intensity_range == (
        100.0,
        250.0,
    )


class DictStore:
    """QSettings' value/setValue, which hands booleans back as strings after a restart."""

    def __init__(self) -> None:
        self.data = {}

    def value(self, key, default=None):
        return self.data.get(key, default)

    def setValue(self, key, value):  # noqa: N802 - QSettings' name
        self.data[key] = str(value)


def test_preferences_survive_a_restart_and_reject_unknown_values():
    store = DictStore()
    assert params.Preferences.load(store) == params.Preferences()
    params.Preferences("sam-med3d-turbo", "cpu", False).save(store)
    assert params.Preferences.load(store) == params.Preferences("sam-med3d-turbo", "cpu", False)
    store.data["FastSAM3DSlicer/device"] = "tpu"
    store.data["FastSAM3DSlicer/positive"] = "maybe"
    loaded = params.Preferences.load(store)
    assert (loaded.device, loaded.positive) == ("auto", True)


# -- targets -------------------------------------------------------------------------------


def test_first_prompt_creates_segmentation_and_segment_on_the_views_volume(scene):
    before = scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    target = interaction.ensure_target(scene.scene, None, None, None, view_volume=scene.volume)
    assert target.created == ("segmentation", "segment")
    assert target.volume is scene.volume
    assert scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1
    segmentation = target.segmentation.GetSegmentation()
    assert segmentation.GetSegment(target.segment_id) is not None
    # The new segmentation takes the volume's geometry, so a write lands on its voxels.
    writer = segment_writer.SegmentWriter(target.segmentation, scene.volume)
    writer.image_to_segmentation()  # raises when volume and segmentation are not linear
    assert target.segmentation.GetDisplayNode() is not None


def test_missing_or_deleted_segment_is_created_existing_is_kept(scene):
    kept = interaction.ensure_target(scene.scene, scene.volume, scene.segmentation, scene.target)
    assert kept.created == () and kept.segment_id == scene.target
    n = scene.segmentation.GetSegmentation().GetNumberOfSegments()
    fresh = interaction.ensure_target(scene.scene, scene.volume, scene.segmentation, "")
    assert fresh.created == ("segment",) and fresh.segmentation is scene.segmentation
    scene.segmentation.GetSegmentation().RemoveSegment(fresh.segment_id)
    again = interaction.ensure_target(
        scene.scene, scene.volume, scene.segmentation, fresh.segment_id
    )
    assert again.created == ("segment",) and again.segment_id != fresh.segment_id
    assert scene.segmentation.GetSegmentation().GetNumberOfSegments() == n + 1


def test_no_volume_anywhere_is_a_clear_refusal(scene):
    with pytest.raises(interaction.NoVolumeError, match="load a volume"):
        interaction.ensure_target(scene.scene, None, None, None, view_volume=None)


def test_new_segment_is_named_and_coloured_by_slicer(scene):
    a = interaction.new_segment(scene.segmentation)
    b = interaction.new_segment(scene.segmentation)
    seg = scene.segmentation.GetSegmentation()
    assert a != b and seg.GetSegment(a).GetName() != seg.GetSegment(b).GetName()
    assert seg.GetSegment(a).GetColor() != seg.GetSegment(b).GetColor()
