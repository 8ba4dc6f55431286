"""The 1.5 mm crop lattice of the reference recipe, crop sampling and paste-back.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CROP",
    "LOWRES",
    "SPACING",
    "Lattice",
    "closest_orientation",
    "crop_to_volume_grid",
    "sample_crop",
    "znormalize",
    "upsample_logits",
    "tile_weights",
    "sample_field",
    "axis_maps",
    "footprint",
    "footprint_box",
    "lattice_box_to_region",
    "box_corners",
    "ras_box_mask",
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

    def ras_to_index(self, ras: np.ndarray) -> np.ndarray:
        """Continuous lattice indices of RAS points (..., 3)."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(ras, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def index_to_ras(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(idx, dtype=np.float64) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def crop_start(self, ras: np.ndarray, size: int = CROP) -> tuple[int, int, int]:
        """Start of the crop centred (as ``CropOrPad`` centres it) on the voxel nearest ``ras``."""
        v = np.floor(self.ras_to_index(ras) + 0.5).astype(np.int64)
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


def _grid(out_shape: Sequence[int], out_to_norm: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, *out_shape, 3) grid for ``grid_sample``: index of each output voxel -> normalised.

    Built by broadcasting three per-axis ramps (cheap) instead of a full matrix product.
    """
    g = torch.as_tensor(out_to_norm[:3], dtype=torch.float32, device=device)
    ramps = [
        torch.arange(n, dtype=torch.float32, device=device)[:, None] * g[:, d]
        for d, n in enumerate(out_shape)
    ]
    ramps[0] = ramps[0] + g[:, 3]
    grid = (ramps[0][:, None, :] + ramps[1][None, :, :])[:, :, None, :] + ramps[2][None, None]
    return grid.unsqueeze(0)


def _inside(grid: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """Points within half a voxel of the outermost voxel centres (ITK's 'inside buffer')."""
    inside = None
    for comp, dim in enumerate((2, 1, 0)):
        half = 1.0 / max(in_shape[dim] - 1, 1)
        c = grid[..., comp]
        ok = (c >= -1.0 - half) & (c < 1.0 + half)
        inside = ok if inside is None else inside & ok
    return inside


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


def sample_crop(
    volume: torch.Tensor,
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    start: Sequence[int],
    size: int = CROP,
) -> torch.Tensor:
    """The ``size^3`` crop of the lattice at ``start``, sampled from the original grid.

    ``volume`` is the (1, 1, K, J, I) float tensor on the model's device. Trilinear, border value
    within half a voxel of the volume's edge, 0 beyond it and beyond the whole resampled volume
    (what torchio/ITK + CropOrPad produce). Returns (size, size, size) in (dim0, dim1, dim2).

    The lattice is parallel to the original axes, so this is three 1D interpolations with
    weights computed in float64: a crop point on an original voxel centre gets exactly that
    voxel's value (as ITK does), which matters for the ``x > 0`` mask of the z-normalisation.
    """
    in_shape = tuple(volume.shape[2:])
    m = crop_to_volume_grid(lattice, ijk_to_ras, start)
    maps = _aligned_maps(m, (size,) * 3)
    if maps is None:
        return _sample_crop_grid(volume, lattice, ijk_to_ras, start, size)
    dev = volume.device
    x = volume[0, 0]
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
    # restrict to the block the crop reads, then interpolate the most-shrinking axis first
    lo = {q: int(min(i0.min(), i1.min())) for _, q, i0, i1, _, _ in plan}
    hi = {q: int(max(i0.max(), i1.max())) + 1 for _, q, i0, i1, _, _ in plan}
    x = x[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    # outer axes first (gathering whole planes/rows is a memcpy), the most-shrinking of them
    # first; the innermost (strided) gather last, on the smallest tensor
    plan.sort(key=lambda p: (p[1] == 2, size / (hi[p[1]] - lo[p[1]])))
    for _, q, i0, i1, w, _ in plan:
        shape = [1, 1, 1]
        shape[q] = -1
        wt = torch.as_tensor(w, dtype=torch.float32, device=dev).view(shape)
        sel: list = [slice(None)] * q
        x0 = x[(*sel, torch.as_tensor(i0 - lo[q], device=dev))]
        x1 = x[(*sel, torch.as_tensor(i1 - lo[q], device=dev))]
        x = torch.lerp(x0, x1, wt)
    plan.sort(key=lambda p: p[0])
    out = x.permute(*[p[1] for p in plan])
    inside = [p[5] for p in plan]
    if not all(v.all() for v in inside):
        t = [torch.as_tensor(v, device=dev, dtype=out.dtype) for v in inside]
        out = out * (t[0][:, None, None] * t[1][None, :, None] * t[2][None, None, :])
    return out.contiguous()


def _sample_crop_grid(
    volume: torch.Tensor, lattice: Lattice, ijk_to_ras: np.ndarray, start: Sequence[int], size: int
) -> torch.Tensor:
    in_shape = volume.shape[2:]
    m = _normaliser(in_shape) @ crop_to_volume_grid(lattice, ijk_to_ras, start)
    grid = _grid((size, size, size), m, volume.device)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, 0] * _inside(grid[0], in_shape)


def znormalize(crop: torch.Tensor) -> torch.Tensor:
    """Z-normalise with mean/std over voxels > 0 (the reference's ``ZNormalization(x > 0)``).

    Guards: fewer than two voxels > 0 uses all voxels; a zero std only subtracts the mean,
    so a constant or empty crop gives zeros instead of NaN.
    """
    x = crop.float()
    m = (x > 0).to(x.dtype)
    n = m.sum()
    if n < 2:
        m = torch.ones_like(x)
        n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)  # unbiased, like torch.std in torchio
    std = var.sqrt()
    if not torch.isfinite(std) or std <= 0:
        return x - mean
    return (x - mean) / std


def upsample_logits(low_res: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """(..., 32, 32, 32) logits -> (size^3) trilinear, as the reference's ``F.interpolate``."""
    x = low_res.reshape(1, 1, *low_res.shape[-3:]).float()
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]


def tile_weights(
    size: int = CROP, ramp: int = 32, device: torch.device | None = None
) -> torch.Tensor:
    """Blending weight of each crop voxel: 1 inside, falling linearly over ``ramp`` voxels
    towards every face (never 0), so overlapping crops fade into each other without seams."""
    a = torch.arange(size, dtype=torch.float32, device=device)
    w = torch.clamp(torch.minimum(a + 1, size - a) / ramp, max=1.0)
    return w[:, None, None] * w[None, :, None] * w[None, None, :]


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


def sample_field(
    field: torch.Tensor,
    field_start: Sequence[int],
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    mode: str = "nearest",
) -> torch.Tensor:
    """Sample a lattice field (C, n0, n1, n2) starting at lattice index ``field_start`` at the
    centres of the original voxels in ``region`` (slices into [k, j, i]).

    Returns (C, nk, nj, ni), border values outside the field (callers mask the footprint
    themselves, see :func:`footprint`). ``mode="nearest"`` is the reference's nearest resample
    back (ITK rounds halves up; so do we); ``"linear"`` gives smoother edges on grids finer
    than 1.5 mm. Separable 1D gathers (fast, exact in float64) when the grids are aligned.
    """
    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode must be 'nearest' or 'linear', not {mode!r}")
    maps = axis_maps(lattice, ijk_to_ras, region)
    if maps is None:
        return _sample_field_grid(field, field_start, lattice, ijk_to_ras, region, mode)
    x = field
    dev = field.device
    # restrict to the part of the field the region reads (a view), then gather the outer axes
    # first (plane/row copies), the innermost last, on the smallest tensor
    plan = []
    for ax in range(3):
        c = maps[ax][1] - field_start[ax]
        n = field.shape[1 + ax]
        if mode == "nearest":
            # exact half-voxel ties (common: 2 mm or 0.75 mm grids vs 1.5 mm) round up, as ITK
            # means to; snapping first keeps float noise from deciding them
            i0 = np.clip(np.floor(np.round(c, 6) + 0.5), 0, n - 1).astype(np.int64)
            i1, w = i0, None
        else:
            c = np.clip(c, 0, n - 1)
            i0 = np.floor(c).astype(np.int64)
            i1 = np.minimum(i0 + 1, n - 1)
            w = c - i0
        plan.append((ax, i0, i1, w))
    if mode == "nearest" and dev.type == "cpu":  # numpy's take is ~4x faster here
        xn = x.numpy()
        for ax, i0, _, _ in reversed(plan):  # innermost first: fastest order measured
            xn = np.take(xn, i0, axis=1 + ax)
        x = torch.from_numpy(xn)
        plan = []
    elif mode == "nearest":  # plain gathers, outer axes first (fastest on GPU)
        for ax, i0, _, _ in plan:
            x = x[(*[slice(None)] * (1 + ax), torch.as_tensor(i0, device=dev))]
        plan = []
    else:
        lo = [int(min(p[1].min(), p[2].min())) for p in plan]
        hi = [int(max(p[1].max(), p[2].max())) + 1 for p in plan]
        x = x[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for ax, i0, i1, w in plan:
        sel: list = [slice(None)] * (1 + ax)
        x0 = x[(*sel, torch.as_tensor(i0 - lo[ax], device=dev))]
        if w is None:
            x = x0
            continue
        shape = [1, 1, 1, 1]
        shape[1 + ax] = -1
        wt = torch.as_tensor(w, dtype=torch.float32, device=dev).view(shape)
        x = torch.lerp(x0.float(), x[(*sel, torch.as_tensor(i1 - lo[ax], device=dev))].float(), wt)
    pos = [0, 0, 0]
    for ax in range(3):
        pos[maps[ax][0]] = ax
    return x.permute(0, 1 + pos[0], 1 + pos[1], 1 + pos[2])


def _sample_field_grid(
    field: torch.Tensor,
    field_start: Sequence[int],
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    mode: str,
) -> torch.Tensor:
    m = _region_to_lattice(lattice, ijk_to_ras, region)
    m[:3, 3] -= np.asarray(field_start, dtype=np.float64)
    out_shape = [s.stop - s.start for s in region]
    grid = _grid(out_shape, _normaliser(field.shape[1:]) @ m, field.device)
    return F.grid_sample(
        field[None].float(),
        grid,
        padding_mode="border",
        mode="bilinear" if mode == "linear" else "nearest",
        align_corners=True,
    )[0]


def _region_to_lattice(
    lattice: Lattice, ijk_to_ras: np.ndarray, region: tuple[slice, slice, slice]
) -> np.ndarray:
    """Region index (k, j, i relative to the region start) -> continuous lattice index."""
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in region]
    return np.linalg.inv(lattice.affine) @ np.asarray(ijk_to_ras) @ kji_to_ijk @ shift


def footprint(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    starts: Sequence[Sequence[int]],
    device: torch.device,
    size: int = CROP,
) -> torch.Tensor | None:
    """Bool (nk, nj, ni): original voxels of ``region`` whose centre lies inside at least one
    crop (its voxels +/- half a voxel, ITK's inside test) — the only voxels a crop may write.
    None when that is all of them (the common case; saves a pass over the region)."""
    out_shape = [s.stop - s.start for s in region]
    maps = axis_maps(lattice, ijk_to_ras, region)
    result = torch.zeros(out_shape, dtype=torch.bool, device=device)
    if maps is None:
        return _footprint_grid(lattice, ijk_to_ras, region, starts, device, size)
    for st in starts:
        parts = []
        for ax in range(3):
            q, c = maps[ax]
            c = c - st[ax]
            v = torch.as_tensor((c >= -0.5) & (c < size - 0.5), device=device)
            shape = [1, 1, 1]
            shape[q] = -1
            parts.append(v.view(shape))
        if all(bool(p.all()) for p in parts):
            return None
        result |= parts[0] & parts[1] & parts[2]
    return result


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


def ras_box_mask(
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    lo: Sequence[float],
    hi: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """Bool (nk, nj, ni): voxels of ``region`` whose centre lies in the RAS box [lo, hi] (mm)."""
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in region]
    to_ras = (np.asarray(ijk_to_ras) @ kji_to_ijk @ shift)[[2, 1, 0, 3]]  # comps as _grid's
    shape = [s.stop - s.start for s in region]
    g = _grid(shape, to_ras, device)[0]  # (.., 3) as (S, A, R)
    lo_t = torch.as_tensor(
        np.asarray(lo, dtype=np.float64)[::-1].copy(), dtype=torch.float32, device=device
    )
    hi_t = torch.as_tensor(
        np.asarray(hi, dtype=np.float64)[::-1].copy(), dtype=torch.float32, device=device
    )
    return ((g >= lo_t) & (g <= hi_t)).all(-1)


def _footprint_grid(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    region: tuple[slice, slice, slice],
    starts: Sequence[Sequence[int]],
    device: torch.device,
    size: int,
) -> torch.Tensor:
    m = _region_to_lattice(lattice, ijk_to_ras, region)
    out_shape = [s.stop - s.start for s in region]
    c = _grid(out_shape, m[[2, 1, 0, 3]], device)[0]  # (.., 3) as (d2, d1, d0)
    result = torch.zeros(out_shape, dtype=torch.bool, device=device)
    for st in starts:
        ok = None
        for comp, dim in enumerate((2, 1, 0)):
            lo = st[dim] - 0.5
            v = (c[..., comp] >= lo) & (c[..., comp] < lo + size)
            ok = v if ok is None else ok & v
        result |= ok
    return result


def lattice_box_to_region(
    lattice: Lattice,
    ijk_to_ras: np.ndarray,
    lo: Sequence[float],
    hi: Sequence[float],
    shape_kji: Sequence[int],
) -> tuple[slice, slice, slice] | None:
    """Smallest region of the original array whose voxel centres cover the lattice box
    [lo, hi] (continuous lattice indices); None when it misses the volume."""
    ras = lattice.index_to_ras(box_corners(lo, hi))
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
