"""The 1.5 mm crop lattice of the reference recipe and the maps between it and a volume (numpy).

SAM-Med3D / FastSAM3D weights were trained and are evaluated on volumes that torchio resampled
to 1.5 mm (``tio.Resample(1.5)``) and then canonicalised (``tio.ToCanonical()``). We reproduce
that lattice exactly for the *whole* volume but only ever sample the 128^3 points of a crop,
straight from the original grid, so no time or memory is spent resampling a whole CT.

Facts reproduced (checked against torchio 1.2.1's source and numerically in the tests):

* ``Resample(1.5)`` keeps the direction of every voxel axis, uses ``floor(n * spacing / 1.5)``
  voxels per axis and keeps the centre of the first..last voxel centres fixed (the new grid is
  centred on the old one). Interpolation is linear; a point within half a voxel outside the
  outermost voxel centres takes the border value, anything further out is 0 (ITK semantics).
* ``ToCanonical`` flips and permutes voxel axes with nibabel's ``io_orientation`` rule so that
  tensor axes (dim0, dim1, dim2) run closest to (R, A, S); oblique directions stay oblique.
* ``CropOrPad(128)`` around a single voxel ``v`` takes lattice voxels ``v - 64 .. v + 63``.

Index conventions: lattice and crop indices are voxel centres (integer = centre), tensors are
indexed (dim0, dim1, dim2). The volume array is ``[k, j, i]``.

The resampling itself (crops, logits, paste-back) has one implementation per array library
with the same functions: :mod:`fastsam3d.geometry` (PyTorch, any device) and
:mod:`fastsam3d.resample_numpy` (numpy, no PyTorch); this module needs numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CROP",
    "LOWRES",
    "SPACING",
    "Lattice",
    "closest_orientation",
    "crop_to_volume_grid",
    "axis_maps",
    "footprint_box",
    "lattice_box_to_region",
    "box_corners",
]

CROP = 128
LOWRES = 32
SPACING = 1.5


def closest_orientation(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each world axis (R, A, S): the voxel axis closest to it and its sign (+1/-1).

    Same rule as nibabel's ``io_orientation`` (which ``ToCanonical`` uses): take the closest
    rotation (polar decomposition), then assign voxel axes to world axes greedily, strongest
    first, so ties resolve the way the reference resolves them.
    """
    rs = np.asarray(direction, dtype=np.float64)
    rs = rs / np.linalg.norm(rs, axis=0)
    u, _, vt = np.linalg.svd(rs)
    r = u @ vt
    world_of_axis = [-1, -1, -1]
    sign_of_axis = [1, 1, 1]
    order = np.argsort(np.min(-(r**2), axis=0), kind="stable")
    for ax in order:
        col = r[:, ax]
        world = int(np.argmax(np.abs(col)))
        world_of_axis[ax] = world
        sign_of_axis[ax] = 1 if col[world] > 0 else -1
        r[world, :] = 0
    axis_of_world = [0, 0, 0]
    sign_of_world = [1, 1, 1]
    for ax, world in enumerate(world_of_axis):
        axis_of_world[world] = ax
        sign_of_world[world] = sign_of_axis[ax]
    return tuple(axis_of_world), tuple(sign_of_world)  # type: ignore[return-value]


@dataclass(frozen=True)
class Lattice:
    """The whole-volume 1.5 mm canonical lattice: index (dim0, dim1, dim2) -> RAS.

    ``affine`` maps continuous lattice indices to RAS mm; ``shape`` is the shape the whole
    resampled + canonicalised volume would have. Crops are windows ``start .. start+127``.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def for_volume(
        cls,
        ijk_to_ras: np.ndarray,
        shape_kji: Sequence[int],
        spacing: float = SPACING,
        anchor: str = "centre",
    ) -> Lattice:
        """``anchor="centre"``: torchio since its "symmetric resampling" change (TorchIO PR
        #1310, June 2025; the installed 1.2.1 does this): ``floor`` voxels per axis, grids
        centred on each other. ``"corner"``: torchio before it, which SAM-Med3D / FastSAM3D
        were trained with: ``ceil`` voxels per axis, the first voxel's outer corner on the
        original first voxel's outer corner. They differ by less than one 1.5 mm voxel."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        size = np.array(shape_kji[::-1], dtype=np.float64)  # (I, J, K)
        a = m[:3, :3]
        old_spacing = np.sqrt(np.sum(a * a, axis=0))
        direction = a / old_spacing
        origin = m[:3, 3]
        if anchor == "centre":
            new_size = np.floor(size * old_spacing / spacing)
            centre = (origin + (origin + a @ (size - 1))) / 2
            new_origin = centre - direction @ ((new_size - 1) / 2 * spacing)
        elif anchor == "corner":
            new_size = np.ceil(size * old_spacing / spacing)
            new_origin = origin + a @ (0.5 * (spacing / old_spacing - 1))
        else:
            raise ValueError(f"anchor must be 'centre' or 'corner', not {anchor!r}")
        from .volume import VolumeError  # a ValueError: the image cannot be segmented

        if np.any(new_size < 1):
            raise VolumeError(
                f"volume extent {np.round(size * old_spacing, 4).tolist()} mm is "
                f"smaller than one {spacing} mm voxel of the model's grid along "
                "some axis: too small an image to segment"
            )
        if np.any(old_spacing > CROP * spacing):
            raise VolumeError(
                f"voxels of {np.round(old_spacing, 1).tolist()} mm are larger than "
                f"the model's {CROP * spacing:g} mm crop: check the image's voxel "
                "size (spacing) in its header"
            )
        axis_of_world, sign_of_world = closest_orientation(direction)
        lat = np.eye(4)
        shape = []
        origin_can = new_origin.copy()
        for w in range(3):
            ax, sgn = axis_of_world[w], sign_of_world[w]
            lat[:3, w] = sgn * spacing * direction[:, ax]
            shape.append(int(new_size[ax]))
            if sgn < 0:
                origin_can = origin_can + spacing * direction[:, ax] * (new_size[ax] - 1)
        lat[:3, 3] = origin_can
        return cls(lat, tuple(shape))  # type: ignore[arg-type]

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def ras_to_lattice(self, ras: np.ndarray) -> np.ndarray:
        """Continuous lattice indices of RAS points (..., 3)."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(ras, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def lattice_to_ras(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(idx, dtype=np.float64) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def crop_start(self, ras: np.ndarray, size: int = CROP) -> tuple[int, int, int]:
        """Start of the crop centred (as ``CropOrPad`` centres it) on the voxel nearest ``ras``."""
        v = np.floor(self.ras_to_lattice(ras) + 0.5).astype(np.int64)
        return tuple(int(x) for x in v - size // 2)  # type: ignore[return-value]

    def crop_affine(self, start: Sequence[int]) -> np.ndarray:
        """Crop index -> RAS for the crop starting at ``start``."""
        t = np.eye(4)
        t[:3, 3] = start
        return self.affine @ t


def _normaliser(shape: Sequence[int]) -> np.ndarray:
    """Index (d0, d1, d2) -> grid_sample coordinates (x=d2, y=d1, z=d0), align_corners=True."""
    n = np.zeros((4, 4))
    for row, dim in enumerate((2, 1, 0)):
        n[row, dim] = 2.0 / max(shape[dim] - 1, 1)
        n[row, 3] = -1.0
    n[3, 3] = 1.0
    return n


def crop_to_volume_grid(
    lattice: Lattice, ijk_to_ras: np.ndarray, start: Sequence[int]
) -> np.ndarray:
    """Crop index (d0, d1, d2) -> volume array index (k, j, i), as a 4x4 matrix."""
    ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    ijk_to_kji = np.eye(4)[[2, 1, 0, 3]]
    return ijk_to_kji @ ras_to_ijk @ lattice.crop_affine(start)


def _aligned_maps(m: np.ndarray, sizes: Sequence[int]) -> list[tuple[int, np.ndarray]] | None:
    """For a 4x4 map from output index to input index whose axes are parallel (a permutation
    with scales): per output axis, (input axis, input coordinate of each output index)."""
    a = m[:3, :3]
    q = np.argmax(np.abs(a), axis=0)  # input axis of each output axis
    if sorted(q.tolist()) != [0, 1, 2]:
        return None
    off = a.copy()
    off[q, np.arange(3)] = 0
    if np.max(np.abs(off)) > 1e-9 * np.max(np.abs(a)):
        return None
    return [
        (int(q[ax]), a[q[ax], ax] * np.arange(sizes[ax], dtype=np.float64) + m[q[ax], 3])
        for ax in range(3)
    ]


def aligned_crop_plan(
    m: np.ndarray,
    lattice: Lattice,
    start: Sequence[int],
    size: int,
    in_shape: Sequence[int],
) -> tuple[list, dict[int, int], dict[int, int]] | None:
    """The separable reading of a crop (``m`` from :func:`crop_to_volume_grid`) when its axes are
    parallel to the volume's, else None: ``(plan, lo, hi)``. ``plan`` holds per crop axis
    ``(axis, volume axis q, i0, i1, weight, inside)`` (linear interpolation between voxels i0
    and i1 of q; ``inside`` = within half a voxel of the volume and on the lattice), sorted in
    the order the interpolations run (outer volume axes first, the most-shrinking first);
    ``lo[q]:hi[q]`` is the block of axis q the crop reads. One plan for the torch and the
    numpy crop sampling, so both read the same voxels with the same weights."""
    maps = _aligned_maps(m, (size,) * 3)
    if maps is None:
        return None
    plan = []
    for ax, (q, c) in enumerate(maps):
        n = in_shape[q]
        inside = (c >= -0.5) & (c < n - 0.5)
        lat_idx = start[ax] + np.arange(size)
        inside &= (lat_idx >= 0) & (lat_idx < lattice.shape[ax])
        cc = np.clip(c, 0, n - 1)
        i0 = np.floor(cc).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        plan.append((ax, q, i0, i1, cc - i0, inside))
    lo = {q: int(min(i0.min(), i1.min())) for _, q, i0, i1, _, _ in plan}
    hi = {q: int(max(i0.max(), i1.max())) + 1 for _, q, i0, i1, _, _ in plan}
    # gathering whole planes/rows of the outer axes is a memcpy: those first, the most-shrinking
    # of them first; the innermost (strided) gather last, on the smallest array
    plan.sort(key=lambda p: (p[1] == 2, size / (hi[p[1]] - lo[p[1]])))
    return plan, lo, hi


def axis_maps(
    lattice: Lattice, ijk_to_ras: np.ndarray, region: tuple[slice, slice, slice]
) -> list[tuple[int, np.ndarray]] | None:
    """Per lattice axis: (region axis it runs along, lattice coordinate of each voxel of the
    region along that axis), in float64.

    ``Resample`` keeps every voxel axis's direction, so lattice axes are always parallel to the
    original ones and mapping between the grids is separable: an exact 1D map per axis. Returns
    None if that does not hold numerically (never for lattices built by ``for_volume``).
    """
    m = _region_to_lattice(lattice, ijk_to_ras, region)
    a = m[:3, :3]
    q = np.argmax(np.abs(a), axis=1)
    if sorted(q.tolist()) != [0, 1, 2]:
        return None
    off = a.copy()
    off[np.arange(3), q] = 0
    if np.max(np.abs(off)) > 1e-9 * np.max(np.abs(a)):
        return None
    out = []
    for ax in range(3):
        n = region[q[ax]].stop - region[q[ax]].start
        out.append((int(q[ax]), a[ax, q[ax]] * np.arange(n, dtype=np.float64) + m[ax, 3]))
    return out


def _region_to_lattice(
    lattice: Lattice, ijk_to_ras: np.ndarray, region: tuple[slice, slice, slice]
) -> np.ndarray:
    """Region index (k, j, i relative to the region start) -> continuous lattice index."""
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in region]
    return np.linalg.inv(lattice.affine) @ np.asarray(ijk_to_ras) @ kji_to_ijk @ shift


def footprint_box(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    start: Sequence[int],
    size: int = CROP,
) -> tuple[slice, slice, slice] | None:
    """One crop's footprint inside ``region`` as slices relative to the region (it is a box:
    the lattice is parallel to the original axes); None if not aligned (use
    :func:`footprint`). An empty slice on some axis means no overlap."""
    maps = axis_maps(lattice, ijk_to_ras, region)
    if maps is None:
        return None
    out: list[slice] = [slice(0, 0)] * 3
    for ax in range(3):
        q, c = maps[ax]
        c = c - start[ax]
        ok = np.nonzero((c >= -0.5) & (c < size - 0.5))[0]
        out[q] = slice(int(ok[0]), int(ok[-1]) + 1) if len(ok) else slice(0, 0)
    return tuple(out)  # type: ignore[return-value]


def lattice_box_to_region(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    lo: Sequence[float],
    hi: Sequence[float],
    shape_kji: Sequence[int],
) -> tuple[slice, slice, slice] | None:
    """Smallest region of the original array whose voxel centres cover the lattice box
    [lo, hi] (continuous lattice indices); None when it misses the volume."""
    ras = lattice.lattice_to_ras(box_corners(lo, hi))
    inv = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    ijk = ras @ inv[:3, :3].T + inv[:3, 3]
    kji = ijk[:, ::-1]
    start = np.maximum(np.floor(kji.min(axis=0)).astype(np.int64), 0)
    stop = np.minimum(np.ceil(kji.max(axis=0)).astype(np.int64) + 1, np.asarray(shape_kji))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


def box_corners(lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """The 8 corners (8, 3) of the axis-aligned box [lo, hi], in the coordinates given."""
    return np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
        dtype=np.float64,
    )
