"""MRML glue: matrix conversions, volume and markups readers (segment writes with masking and
undo are in :mod:`.segment_writer`).

Written against MRML and module-logic classes only (no ``slicer.util``, no Qt), so the same
code runs inside the Slicer application and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import FastSAM3DSlicerError
from .geometry import as_matrix

# ---------------------------------------------------------------------------------------------
# small conversions


def matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ensure_segmentation_converters() -> None:
    """Register the labelmap/surface conversion rules once, as the Slicer app does at start-up.

    Without them a headless scene cannot create or convert segment representations.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for name in (
        "vtkBinaryLabelmapToClosedSurfaceConversionRule",
        "vtkClosedSurfaceToBinaryLabelmapConversionRule",
        "vtkClosedSurfaceToFractionalLabelmapConversionRule",
        "vtkFractionalLabelmapToClosedSurfaceConversionRule",
    ):
        rule = getattr(slicer, name, None)
        if rule is not None:
            factory.RegisterConverterRule(rule())


# ---------------------------------------------------------------------------------------------
# volumes


class VolumeDataError(FastSAM3DSlicerError, ValueError):
    """The volume cannot be segmented as it is (no voxels, several components per voxel)."""


def volume_ijk_to_ras(volume_node: slicer.vtkMRMLScalarVolumeNode) -> np.ndarray:
    """IJK -> the volume's own RAS (hardened transforms are already part of it)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


def volume_array(volume_node: slicer.vtkMRMLScalarVolumeNode) -> np.ndarray:
    """A private copy of the voxels as [k, j, i]: the worker thread must not share MRML memory."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise VolumeDataError(f"volume {volume_node.GetName()!r} has no image data")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise VolumeDataError(
            f"volume {volume_node.GetName()!r} has {scalars.GetNumberOfComponents()} components "
            "per voxel; select a single-channel (grey-level) CT or MR volume"
        )
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i).copy()


def volume_signature(volume_node: slicer.vtkMRMLScalarVolumeNode) -> tuple:
    """Changes whenever voxels or geometry change, so a stale session can be detected in O(1)."""
    image = volume_node.GetImageData()
    return (
        volume_node.GetID(),
        image.GetMTime() if image is not None else 0,
        tuple(np.round(volume_ijk_to_ras(volume_node), 9).ravel()),
    )


def world_to_volume_ras(
    volume_node: slicer.vtkMRMLScalarVolumeNode, world_ras: Sequence[float]
) -> np.ndarray:
    """World RAS -> the volume's own RAS through the inverse of its (non-hardened) transforms.

    A general transform is used so that non-linear (warping) parents work for points too.
    """
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return np.asarray(world_ras, dtype=np.float64)
    to_volume = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, to_volume)
    return np.asarray(to_volume.TransformPoint([float(x) for x in world_ras]), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# markups


def control_points_world(markups_node: slicer.vtkMRMLMarkupsNode) -> list[np.ndarray]:
    out = []
    p = [0.0, 0.0, 0.0]
    for n in range(markups_node.GetNumberOfControlPoints()):
        markups_node.GetNthControlPointPositionWorld(n, p)
        out.append(np.array(p, dtype=np.float64))
    return out


def roi_corners_world(roi_node: slicer.vtkMRMLMarkupsROINode) -> np.ndarray:
    """The eight corners of a (possibly rotated, possibly transformed) ROI in world RAS."""
    half = np.asarray(roi_node.GetSize(), dtype=np.float64) / 2.0
    object_to_world = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
    corners = np.c_[signs * half, np.ones(8)]
    return (object_to_world @ corners.T).T[:, :3]


def roi_box_in_volume(
    volume_node: slicer.vtkMRMLScalarVolumeNode, roi_node: slicer.vtkMRMLMarkupsROINode
) -> tuple[np.ndarray, np.ndarray]:
    """The ROI as an axis-aligned box (ras_min, ras_max) in the volume's own RAS.

    A rotated ROI becomes its bounding box: the session takes axis-aligned boxes.
    """
    corners = np.array([world_to_volume_ras(volume_node, c) for c in roi_corners_world(roi_node)])
    return corners.min(axis=0), corners.max(axis=0)


# ---------------------------------------------------------------------------------------------
# segmentations


def volume_array_shape(volume_node: slicer.vtkMRMLScalarVolumeNode) -> tuple[int, int, int]:
    i, j, k = volume_node.GetImageData().GetDimensions()
    return (k, j, i)


def segment_ids(segmentation_node: slicer.vtkMRMLSegmentationNode) -> Iterable[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]


__all__ = [
    "VolumeDataError",
    "as_matrix",
    "control_points_world",
    "ensure_segmentation_converters",
    "matrix_to_numpy",
    "numpy_to_matrix",
    "roi_box_in_volume",
    "roi_corners_world",
    "segment_ids",
    "volume_array",
    "volume_array_shape",
    "volume_ijk_to_ras",
    "volume_signature",
    "world_to_volume_ras",
]
