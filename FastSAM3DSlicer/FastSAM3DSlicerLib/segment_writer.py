"""Segment writes: a session result into one segment's labelmap, with masking and undo.

:class:`SegmentWriter` writes inside the result's region only, following the Segment Editor's
masking (:class:`MaskingSettings`), and returns an :class:`UndoEntry` that restores exactly what
it changed. Like :mod:`.mrml` (the conversions and readers it builds on), written against MRML
and module-logic classes only (no ``slicer.util``, no Qt): it runs inside the Slicer application
and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import FastSAM3DSlicerError
from .geometry import Region, extent_is_empty, region_to_extent
from .mrml import (
    ensure_segmentation_converters,
    matrix_to_numpy,
    numpy_to_matrix,
    volume_array_shape,
    volume_ijk_to_ras,
)


@dataclasses.dataclass(frozen=True)
class MaskingSettings:
    """The Segment Editor's masking options that decide which voxels an edit may change.

    Defaults are Slicer's own defaults (edit everywhere, overwrite all other segments).
    """

    mask_mode: int = 0  # vtkMRMLSegmentationNode.EditAllowed*
    mask_segment_id: str = ""
    overwrite_mode: int = 0  # vtkMRMLSegmentEditorNode.Overwrite*
    intensity_mask: bool = False
    intensity_range: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_segment_editor_node(
        cls, node: slicer.vtkMRMLSegmentEditorNode | None
    ) -> MaskingSettings:
        if node is None:
            return cls()
        return cls(
            mask_mode=int(node.GetMaskMode()),
            mask_segment_id=node.GetMaskSegmentID() or "",
            overwrite_mode=int(node.GetOverwriteMode()),
            intensity_mask=bool(node.GetSourceVolumeIntensityMask()),
            intensity_range=tuple(node.GetSourceVolumeIntensityMaskRange()),
        )


@dataclasses.dataclass
class UndoEntry:
    """Previous contents of every segment one write changed, inside that write's extent."""

    segmentation_id: str
    extent: tuple[int, ...]
    image_to_segmentation: np.ndarray
    previous: dict[str, np.ndarray]  # segment id -> uint8 [k, j, i] over the extent
    # the edited segment right after the write, bit-packed (a session keeps one per prompt)
    after_bits: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.previous

    @property
    def after(self) -> np.ndarray | None:
        """The edited segment right after the write: bool [k, j, i] over the extent."""
        if self.after_bits is None:
            return None
        e = self.extent
        shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
        return np.unpackbits(self.after_bits, count=int(np.prod(shape))).reshape(shape) > 0


class SegmentMissingError(FastSAM3DSlicerError, KeyError):
    """The target segment is not (or no longer) in its segmentation."""


class GeometryError(FastSAM3DSlicerError, ValueError):
    """Volume and segmentation frames cannot be related by a linear transform."""


def _oriented_image(
    image_to_world: np.ndarray, extent: Sequence[int], values: np.ndarray | None = None
) -> slicer.vtkOrientedImageData:
    img = slicer.vtkOrientedImageData()
    img.SetExtent(*[int(e) for e in extent])
    img.SetImageToWorldMatrix(numpy_to_matrix(image_to_world))
    if values is not None:
        flat = np.ascontiguousarray(values, dtype=np.uint8).ravel()
        img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = flat
    return img


def _image_values(img: slicer.vtkOrientedImageData, extent: Sequence[int]) -> np.ndarray:
    i0, i1, j0, j1, k0, k1 = extent
    scalars = img.GetPointData().GetScalars()
    return numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)


class SegmentWriter:
    """Writes a session result into one segment, inside the result's region only.

    Masking follows the Segment Editor: the editable area (mask mode, intensity range) limits the
    voxels that change, and the overwrite mode decides which other segments lose the voxels the
    edited segment gains. Every write returns an :class:`UndoEntry` that restores exactly the
    previous contents of the segments it changed; voxels outside the region are never touched.
    """

    def __init__(
        self,
        segmentation_node: slicer.vtkMRMLSegmentationNode,
        volume_node: slicer.vtkMRMLScalarVolumeNode,
    ) -> None:
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        self.allow_in_place = True  # tests switch it off to compare with Slicer's own writes
        ensure_segmentation_converters()
        segmentation = segmentation_node.GetSegmentation()
        name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        if not segmentation.GetConversionParameter(name):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)

    # -- geometry -------------------------------------------------------------------------

    def image_to_segmentation(self) -> np.ndarray:
        """Volume IJK -> the segmentation node's frame (linear transforms only)."""
        m = vtk.vtkMatrix4x4()
        ok = slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            self.volume_node.GetParentTransformNode(),
            self.segmentation_node.GetParentTransformNode(),
            m,
        )
        if not ok:
            raise GeometryError(
                "The volume and the segmentation are related by a non-linear transform; harden "
                "the transform on the volume or put both under the same transform."
            )
        return matrix_to_numpy(m) @ volume_ijk_to_ras(self.volume_node)

    # -- reading ----------------------------------------------------------------------------

    def read_segment(
        self, segment_id: str, image_to_seg: np.ndarray, extent: Sequence[int]
    ) -> np.ndarray:
        """The segment as 0/1 uint8 [k, j, i] on the volume grid over ``extent``."""
        fast = self._read_layer_in_place(segment_id, image_to_seg, extent)
        if fast is not None:
            return fast
        labelmap, label = self.snapshot_segment(segment_id)
        return read_labelmap(labelmap, label, image_to_seg, extent)

    def check_segment(self, segment_id: str) -> None:
        """Raise a KeyError naming the segment when it is not (or no longer) there."""
        self._segment(segment_id)

    def _segment(self, segment_id: str) -> slicer.vtkSegment:
        """The segment, or a KeyError that names it (the user may have deleted it)."""
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            raise SegmentMissingError(
                f"segment {segment_id!r} is not in {self.segmentation_node.GetName()!r} "
                "(was it deleted?)"
            )
        return segment

    def _layer_on_grid(self, segment_id: str, image_to_seg: np.ndarray) -> tuple | None:
        """(segment, layer image, [k, j, i] numpy view of it, its extent) when the segment's
        (possibly shared) labelmap layer lies exactly on our grid, else None."""
        segmentation = self.segmentation_node.GetSegmentation()
        segment = self._segment(segment_id)
        name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        if segmentation.GetSourceRepresentationName() != name:
            return None
        layer = segment.GetRepresentation(name)
        if layer is None or not layer.IsA("vtkOrientedImageData"):
            return None
        m = vtk.vtkMatrix4x4()
        layer.GetImageToWorldMatrix(m)
        if not np.allclose(matrix_to_numpy(m), image_to_seg, rtol=0, atol=1e-6):
            return None
        have = tuple(layer.GetExtent())
        scalars = layer.GetPointData().GetScalars()
        if scalars is None or extent_is_empty(have):
            return segment, layer, None, have
        if scalars.GetNumberOfComponents() != 1:
            return None
        view = numpy_support.vtk_to_numpy(scalars).reshape(
            have[5] - have[4] + 1, have[3] - have[2] + 1, have[1] - have[0] + 1
        )
        return segment, layer, view, have

    def _read_layer_in_place(
        self, segment_id: str, image_to_seg: np.ndarray, extent: Sequence[int]
    ) -> np.ndarray | None:
        """Fast path: slice the segment's layer when it lies on our grid (no whole-layer copy
        per segment per click); None means "use the general, resampling path"."""
        found = self._layer_on_grid(segment_id, image_to_seg)
        if found is None:
            return None
        segment, _, view, have = found
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        out = np.zeros(shape, np.uint8)
        if view is None:
            return out
        lo = [max(extent[2 * a], have[2 * a]) for a in range(3)]
        hi = [min(extent[2 * a + 1], have[2 * a + 1]) for a in range(3)]
        if any(lo[a] > hi[a] for a in range(3)):
            return out
        src = view[
            lo[2] - have[4] : hi[2] - have[4] + 1,
            lo[1] - have[2] : hi[1] - have[2] + 1,
            lo[0] - have[0] : hi[0] - have[0] + 1,
        ]
        out[
            lo[2] - extent[4] : hi[2] - extent[4] + 1,
            lo[1] - extent[2] : hi[1] - extent[2] + 1,
            lo[0] - extent[0] : hi[0] - extent[0] + 1,
        ] = src == segment.GetLabelValue()
        return out

    def _write_in_place(
        self, segment_id: str, image_to_seg: np.ndarray, extent: Sequence[int], values: np.ndarray
    ) -> bool:
        """Write straight into the segment's layer when that is exact; False: not possible.

        Possible when the layer lies on our grid, covers ``extent``, and no voxel to be set
        belongs to another segment of the same shared layer (one voxel holds one label there;
        overlap needs Slicer to split layers). Ten times faster than SetBinaryLabelmapToSegment
        on CT-sized crops, which matters because every click writes a whole crop.
        """
        found = self._layer_on_grid(segment_id, image_to_seg)
        if found is None:
            return False
        segment, layer, view, have = found
        if view is None:
            return False  # an empty layer: let Slicer allocate it
        if any(
            extent[2 * a] < have[2 * a] or extent[2 * a + 1] > have[2 * a + 1] for a in range(3)
        ):
            # Slicer keeps layers at the segments' bounding box. Growing one here replaces its
            # data, which makes vtkSegmentation drop the derived representations (closed
            # surfaces) of every segment: fine when there are none (Show 3D off), else let
            # Slicer's own merge grow it (slower, but rebuilds only this segment's surface).
            if self._has_derived_representations():
                return False
            view, have = self._grow_layer(layer, view, have, extent)
        sub = view[
            extent[4] - have[4] : extent[5] - have[4] + 1,
            extent[2] - have[2] : extent[3] - have[2] + 1,
            extent[0] - have[0] : extent[1] - have[0] + 1,
        ]
        label = segment.GetLabelValue()
        if label <= 0 or label > np.iinfo(sub.dtype).max:
            return False
        ours = sub == label
        if (values & (sub != 0) & ~ours).any():
            return False  # would take voxels of another segment in this layer
        changed = ours != values
        first = int(changed.argmax())  # stops at the first True
        if not changed.flat[first]:
            return True
        # All changes but one go straight into the layer; the scalars' Modified() gives it a new
        # MTime for every pipeline that reads it (vtkDataSet's MTime includes its point data)
        # without the layer's own Modified event, which vtkSegmentation answers by dropping
        # the derived representations (closed surfaces) of every segment (m12). The last
        # voxel goes through Slicer's own merge, which notifies for this segment only
        # (SourceRepresentationModified with its ID, display update, its surface rebuilt).
        k, j, i = np.unravel_index(first, changed.shape)
        last = bool(values[k, j, i])
        before = sub[k, j, i]
        sub[ours & ~values] = 0
        sub[values & ~ours] = label
        sub[k, j, i] = before  # this one goes through Slicer below
        layer.GetPointData().GetScalars().Modified()
        x, y, z = extent[0] + i, extent[2] + j, extent[4] + k
        one = (x, x, y, y, z, z)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        mode, value = (logic.MODE_MERGE_MASK, 1) if last else (logic.MODE_MERGE_MIN, 0)
        if not logic.SetBinaryLabelmapToSegment(
            _oriented_image(image_to_seg, one, np.full((1, 1, 1), value, np.uint8)),
            self.segmentation_node,
            segment_id,
            mode,
            one,
            False,
            [],
        ):
            raise RuntimeError(f"writing segment {segment_id!r} failed")
        return True

    def _has_derived_representations(self) -> bool:
        """Whether any segment holds a representation besides the source (e.g. Show 3D's
        closed surfaces), which a replaced layer would make Slicer drop for all segments."""
        segmentation = self.segmentation_node.GetSegmentation()
        source = segmentation.GetSourceRepresentationName()
        return any(
            name != source and segmentation.ContainsRepresentation(name)
            for name in (
                slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName(),
                slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                "Fractional labelmap",
                "Planar contour",
            )
        )

    def snapshot_segment(self, segment_id: str) -> tuple[slicer.vtkOrientedImageData, int]:
        """An independent copy of the segment's labelmap and the label value it uses there.

        In the segmentation node's own frame (``applyParentTransform=False``), the frame of
        :meth:`image_to_segmentation`: the default would return it in world coordinates, and
        reading that on our grid under a transformed segmentation shifts every voxel (M1).
        """
        segment = self._segment(segment_id)
        labelmap = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            self.segmentation_node, segment_id, labelmap, False
        )
        copy = slicer.vtkOrientedImageData()
        copy.DeepCopy(labelmap)
        return copy, int(segment.GetLabelValue())

    @staticmethod
    def _grow_layer(
        layer: slicer.vtkOrientedImageData,
        view: np.ndarray,
        have: Sequence[int],
        extent: Sequence[int],
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        union = tuple((min if b % 2 == 0 else max)(int(have[b]), int(extent[b])) for b in range(6))
        grown = slicer.vtkOrientedImageData()
        grown.SetExtent(*union)
        m = vtk.vtkMatrix4x4()
        layer.GetImageToWorldMatrix(m)
        grown.SetImageToWorldMatrix(m)
        grown.AllocateScalars(layer.GetScalarType(), 1)
        new_view = numpy_support.vtk_to_numpy(grown.GetPointData().GetScalars()).reshape(
            union[5] - union[4] + 1, union[3] - union[2] + 1, union[1] - union[0] + 1
        )
        new_view[:] = 0
        new_view[
            have[4] - union[4] : have[5] - union[4] + 1,
            have[2] - union[2] : have[3] - union[2] + 1,
            have[0] - union[0] : have[1] - union[0] + 1,
        ] = view
        layer.DeepCopy(grown)
        scalars = layer.GetPointData().GetScalars()
        return numpy_support.vtk_to_numpy(scalars).reshape(new_view.shape), union

    def _write_segment(
        self, segment_id: str, image_to_seg: np.ndarray, extent: Sequence[int], values: np.ndarray
    ) -> None:
        """Make the segment equal ``values`` inside ``extent``; voxels outside are kept.

        MODE_REPLACE would replace the whole segment with the modifier (its extent argument
        does not limit it), so, as Slicer's Segment Editor does, removals are a MERGE_MIN with
        255 = keep / 0 = remove (255 so that any label value survives the minimum) and
        additions a MERGE_MASK of the 0/1 values; both leave voxels outside the modifier alone.
        """
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        values = np.asarray(values, np.uint8) > 0
        if self.allow_in_place and self._write_in_place(segment_id, image_to_seg, extent, values):
            return
        current = self.read_segment(segment_id, image_to_seg, extent) > 0
        ext = tuple(int(e) for e in extent)
        steps = []
        if (current & ~values).any():
            steps.append((logic.MODE_MERGE_MIN, np.where(values, 255, 0)))
        if (values & ~current).any():
            steps.append((logic.MODE_MERGE_MASK, values))
        for mode, modifier_values in steps:
            modifier = _oriented_image(image_to_seg, extent, modifier_values)
            # An empty overwrite list: this call must never touch another segment.
            if not logic.SetBinaryLabelmapToSegment(
                modifier, self.segmentation_node, segment_id, mode, ext, False, []
            ):
                raise RuntimeError(f"writing segment {segment_id!r} failed")

    # -- masking ----------------------------------------------------------------------------

    def _segments_to_overwrite(self, segment_id: str, settings: MaskingSettings) -> list[str]:
        segmentation = self.segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        others = [s for s in ids if s != segment_id]
        if settings.overwrite_mode == slicer.vtkMRMLSegmentEditorNode.OverwriteNone:
            return []
        if settings.overwrite_mode == slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments:
            display = self.segmentation_node.GetDisplayNode()
            if display is not None:
                return [s for s in others if display.GetSegmentVisibility(s)]
        return others

    def editable(
        self,
        segment_id: str,
        image_to_seg: np.ndarray,
        extent: Sequence[int],
        settings: MaskingSettings,
        region_voxels: np.ndarray | None,
    ) -> np.ndarray:
        """Bool [k, j, i]: where the Segment Editor settings allow this edit to change voxels."""
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        everywhere = slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
        if settings.mask_mode == everywhere and not settings.intensity_mask:
            return np.ones(shape, bool)
        reference = _oriented_image(image_to_seg, extent)
        forbidden = slicer.vtkOrientedImageData()
        source = None
        intensity_range = None
        if settings.intensity_mask and region_voxels is not None:
            source = slicer.vtkOrientedImageData()
            source.SetExtent(*[int(e) for e in extent])
            source.SetImageToWorldMatrix(numpy_to_matrix(image_to_seg))
            source.AllocateScalars(vtk.VTK_FLOAT, 1)
            numpy_support.vtk_to_numpy(source.GetPointData().GetScalars())[:] = np.asarray(
                region_voxels, np.float32
            ).ravel()
            intensity_range = [
                float(settings.intensity_range[0]),
                float(settings.intensity_range[1]),
            ]
        ok = self.segmentation_node.GenerateEditMask(
            forbidden,
            settings.mask_mode,
            reference,
            segment_id,
            settings.mask_segment_id,
            source,
            intensity_range,
        )
        if not ok:
            raise RuntimeError("could not compute the Segment Editor's editable area")
        if forbidden.GetPointData().GetScalars() is None:
            return np.ones(shape, bool)
        # GenerateEditMask marks the voxels that must NOT be edited with non-zero values.
        return _image_values(forbidden, extent) == 0

    # -- the write --------------------------------------------------------------------------

    def write(
        self,
        segment_id: str,
        region: Region,
        mask: np.ndarray,
        settings: MaskingSettings | None = None,
        keep: np.ndarray | None = None,
        region_voxels: np.ndarray | None = None,
    ) -> UndoEntry:
        """Make ``segment_id`` equal ``mask | keep`` inside ``region`` where editing is allowed.

        ``mask`` is the result (bool over the region); ``keep`` the voxels the user owns (held
        before the session started or edited in outside FastSAM3D: a session never deletes
        them).
        ``region_voxels`` (the volume's intensities over the region) is needed only for the
        intensity-range mask.
        """
        settings = settings or MaskingSettings()
        volume_shape = volume_array_shape(self.volume_node)
        extent = region_to_extent(region, volume_shape)
        if extent_is_empty(extent):
            return UndoEntry(self.segmentation_node.GetID(), extent, np.eye(4), {})
        image_to_seg = self.image_to_segmentation()
        mask = np.asarray(mask, bool)
        expected = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        if mask.shape != expected:
            raise ValueError(f"result mask has shape {mask.shape}, region needs {expected}")
        desired = mask | (np.asarray(keep, bool) if keep is not None else False)
        others = self._segments_to_overwrite(segment_id, settings)
        before = {s: self.read_segment(s, image_to_seg, extent) for s in [segment_id, *others]}
        allowed = self.editable(segment_id, image_to_seg, extent, settings, region_voxels)
        new = np.where(allowed, desired, before[segment_id].astype(bool))
        gained = new & allowed & desired

        node = self.segmentation_node
        was_modifying = node.StartModify()
        try:
            scene = node.GetScene()
            if scene is not None and scene.GetUndoFlag():
                scene.SaveStateForUndo(node)
            changed: dict[str, np.ndarray] = {}
            if not np.array_equal(new, before[segment_id].astype(bool)):
                self._write_segment(segment_id, image_to_seg, extent, new)
                changed[segment_id] = before[segment_id]
            for other in others:
                old = before[other].astype(bool)
                if (old & gained).any():
                    self._write_segment(other, image_to_seg, extent, old & ~gained)
                    changed[other] = before[other]
        finally:
            node.EndModify(was_modifying)
        return UndoEntry(node.GetID(), extent, image_to_seg, changed, np.packbits(new))

    def restore(self, entry: UndoEntry) -> None:
        """Put back the contents an earlier :meth:`write` replaced (newest entry first)."""
        if entry.empty:
            return
        node = self.segmentation_node
        was_modifying = node.StartModify()
        try:
            # First take away what each segment gained, then give back what it lost: no step
            # ever makes two segments claim a voxel that they did not both claim before.
            current = {
                s: self.read_segment(s, entry.image_to_segmentation, entry.extent)
                for s in entry.previous
            }
            for s, old in entry.previous.items():
                shrunk = current[s].astype(bool) & old.astype(bool)
                if not np.array_equal(shrunk, current[s].astype(bool)):
                    self._write_segment(s, entry.image_to_segmentation, entry.extent, shrunk)
            for s, old in entry.previous.items():
                self._write_segment(s, entry.image_to_segmentation, entry.extent, old)
        finally:
            node.EndModify(was_modifying)


def read_labelmap(
    labelmap: slicer.vtkOrientedImageData,
    label: int,
    image_to_seg: np.ndarray,
    extent: Sequence[int],
) -> np.ndarray:
    """0/1 uint8 [k, j, i] of ``labelmap == label`` on the grid ``image_to_seg`` over ``extent``.

    Nearest-neighbour resampling, so a labelmap on another grid (oversampled segmentation,
    other reference volume) is read the way Slicer itself would show it.
    """
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if labelmap.GetPointData().GetScalars() is None or extent_is_empty(labelmap.GetExtent()):
        return np.zeros(shape, np.uint8)
    reference = _oriented_image(image_to_seg, extent)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True
    )
    if resampled.GetPointData().GetScalars() is None:
        return np.zeros(shape, np.uint8)
    # Padding makes the output the union of both extents: cut out ours.
    have = resampled.GetExtent()
    if any(have[2 * a] > extent[2 * a] or have[2 * a + 1] < extent[2 * a + 1] for a in range(3)):
        raise RuntimeError(f"resampling gave extent {have}, which does not cover {extent}")
    values = _image_values(resampled, have)
    values = values[
        extent[4] - have[4] : extent[5] - have[4] + 1,
        extent[2] - have[2] : extent[3] - have[2] + 1,
        extent[0] - have[0] : extent[1] - have[0] + 1,
    ]
    # A shared labelmap layer holds several segments, each under its own label value.
    return (values == label).astype(np.uint8)


__all__ = [
    "GeometryError",
    "MaskingSettings",
    "SegmentMissingError",
    "SegmentWriter",
    "UndoEntry",
    "read_labelmap",
]
