"""Real-MRML scenes (slicer-core) for the Slicer module's Lib, and a deterministic session stub.

The scene is what breaks naive RAS->IJK code: an oblique, anisotropic volume with a non-RAS
axis order under a (non-hardened) rotating + translating linear transform, a segmentation in
world coordinates with two segments, and a markups point list.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
for p in (REPO / "FastSAM3DSlicer", REPO / "model" / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML wheel) is required")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402  (after the slicer-core check)

from FastSAM3DSlicerLib import mrml, segment_writer  # noqa: E402


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    m = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }[axis]
    return np.array(m, float)


@dataclasses.dataclass
class Scene:
    scene: object
    volume: object
    transform: object
    segmentation: object
    points: object
    target: str  # the selected segment
    other: str  # a segment that must never be erased
    ijk_to_ras: np.ndarray  # volume's own
    to_world: np.ndarray  # the parent transform's matrix

    def world_of_ijk(self, ijk) -> np.ndarray:
        p = self.to_world @ self.ijk_to_ras @ np.array([*map(float, ijk), 1.0])
        return p[:3]

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k = self.volume.GetImageData().GetDimensions()
        return (k, j, i)

    def segment(self, segment_id: str) -> np.ndarray:
        """The segment on the whole volume grid (bool [k, j, i])."""
        writer = segment_writer.SegmentWriter(self.segmentation, self.volume)
        k, j, i = self.shape
        return writer.read_segment(
            segment_id, writer.image_to_segmentation(), (0, i - 1, 0, j - 1, 0, k - 1)
        ).astype(bool)

    def segment_value_at_world(self, segment_id: str, world) -> bool:
        """Independent of our reader: look the world point up in the segment's own labelmap."""
        oriented = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            self.segmentation, segment_id, oriented
        )
        labelmap = oriented
        m = vtk.vtkMatrix4x4()
        labelmap.GetWorldToImageMatrix(m)  # segmentation node has no parent: its frame = world
        ijk = mrml.matrix_to_numpy(m) @ np.array([*world, 1.0])
        idx = np.round(ijk[:3]).astype(int)
        ext = labelmap.GetExtent()
        if any(idx[a] < ext[2 * a] or idx[a] > ext[2 * a + 1] for a in range(3)):
            return False
        label = self.segmentation.GetSegmentation().GetSegment(segment_id).GetLabelValue()
        return labelmap.GetScalarComponentAsDouble(*idx, 0) == label

    def add_point_world(self, world) -> int:
        return self.points.AddControlPointWorld(vtk.vtkVector3d(*map(float, world)))


def _oriented(ijk_to_world: np.ndarray, values: np.ndarray) -> object:
    img = slicer.vtkOrientedImageData()
    k, j, i = values.shape
    img.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    img.SetImageToWorldMatrix(mrml.numpy_to_matrix(ijk_to_world))
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    from vtk.util import numpy_support

    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = values.astype(np.uint8).ravel()
    return img


def build_scene(
    shape_kji=(36, 40, 44), spacing=(1.3, 0.9, 2.1), other_block=None, mrml_scene=None
) -> Scene:
    """The test scene; in ``mrml_scene`` when given (e.g. after Clear: node IDs are reused)."""
    mrml.ensure_segmentation_converters()
    scene = mrml_scene if mrml_scene is not None else slicer.vtkMRMLScene()
    k, j, i = shape_kji
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[0:k, 0:j, 0:i]
    c = np.array([k, j, i]) / 2
    blob = sum(((g - cc) / (n / 4)) ** 2 for g, cc, n in zip((zz, yy, xx), c, (k, j, i)))
    array = (np.where(blob < 1, 300, 40) + rng.normal(0, 5, shape_kji)).astype(np.int16)

    # Oblique direction matrix with axes permuted (i ~ S, j ~ R, k ~ A) and a reflection.
    directions = (
        rotation("z", 25) @ rotation("x", -15) @ np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float)
    )
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions @ np.diag(spacing)
    ijk_to_ras[:3, 3] = [-20.0, 35.0, -60.0]

    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("oblique")
    scene.AddNode(volume)
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    from vtk.util import numpy_support

    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(mrml.numpy_to_matrix(ijk_to_ras))

    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    to_world = np.eye(4)
    to_world[:3, :3] = rotation("y", 30) @ rotation("z", -40)
    to_world[:3, 3] = [12.0, -7.0, 25.0]
    transform.SetMatrixTransformToParent(mrml.numpy_to_matrix(to_world))
    volume.SetAndObserveTransformNodeID(transform.GetID())

    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("target", "target")
    other = segmentation.GetSegmentation().AddEmptySegment("other", "other")
    other_mask = np.zeros(shape_kji, bool)
    kb, jb, ib = other_block or (slice(2, 10), slice(3, 12), slice(4, 15))
    other_mask[kb, jb, ib] = True
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _oriented(to_world @ ijk_to_ras, other_mask),
        segmentation,
        other,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
    )
    assert ok

    points = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(points)
    return Scene(
        scene, volume, transform, segmentation, points, target, other, ijk_to_ras, to_world
    )


# ---------------------------------------------------------------------------------------------
# deterministic stand-in for fastsam3d.Session: a sphere of radius R voxels around each click


@dataclasses.dataclass
class StubResult:
    region: tuple
    mask: np.ndarray

    def full_mask(self, shape) -> np.ndarray:
        out = np.zeros(shape, bool)
        out[self.region] = self.mask
        return out


class SphereSession:
    """Same API as fastsam3d.Session; each positive click adds a voxel sphere, negative removes.

    The result's region is a cube of HALF voxels around the click, so "outside the region" is
    a real, non-empty part of the volume. Its correctness is what world-position tests need.
    """

    RADIUS = 3.0
    HALF = 6

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.state: list[np.ndarray] = []
        self.regions: list[tuple] = []

    def set_volume(self, volume) -> None:
        array, ijk_to_ras = volume
        self.shape = array.shape
        self.ijk_to_ras = np.asarray(ijk_to_ras)
        self.state = [np.zeros(self.shape, bool)]
        self.regions = []

    def _region(self, center_kji) -> tuple:
        return tuple(
            slice(max(0, c - self.HALF), min(n, c + self.HALF + 1))
            for c, n in zip(center_kji, self.shape)
        )

    def add_point(self, ras, positive=True) -> StubResult:
        self.calls.append(("point", tuple(ras), positive))
        ijk = np.linalg.inv(self.ijk_to_ras) @ np.array([*ras, 1.0])
        center = np.round(ijk[:3][::-1]).astype(int)
        region = self._region(center)
        zz, yy, xx = np.ogrid[region]
        ball = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (
            xx - center[2]
        ) ** 2 <= self.RADIUS**2
        full = self.state[-1].copy()
        full[region] = full[region] | ball if positive else full[region] & ~ball
        self.state.append(full)
        self.regions.append(region)
        return StubResult(region, full[region].copy())

    def add_box(self, ras_min, ras_max) -> StubResult:
        self.calls.append(("box", tuple(ras_min), tuple(ras_max)))
        return self.add_point((np.asarray(ras_min) + np.asarray(ras_max)) / 2, True)

    def undo(self):
        self.calls.append(("undo",))
        if len(self.state) > 1:
            self.state.pop()
            self.regions.pop()

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.state = [np.zeros(self.shape, bool)]
        self.regions = []


class StubEngine:
    device = "cpu"

    def __init__(self) -> None:
        self.sessions: list[SphereSession] = []

    def new_session(self) -> SphereSession:
        s = SphereSession()
        self.sessions.append(s)
        return s

    def make_volume(self, array, ijk_to_ras):
        return (array, ijk_to_ras)
