"""The crop lattice reproduces torchio's Resample(1.5) + ToCanonical, and paste-back lands in
the right place, for flipped, permuted, oblique and anisotropic grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsam3d import geometry as geo

torchio = pytest.importorskip("torchio")
nib = pytest.importorskip("nibabel")


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


@st.composite
def grids(
    draw: st.DrawFn, max_size: int = 24, max_angle: float = 0.6
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An IJK->RAS matrix (axis permutation, flips, optional rotation, anisotropic spacing)
    and an array shape [k, j, i]."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    base = np.eye(3)[:, perm] * flips
    if draw(st.booleans()):
        # no subnormal angles: ITK's direction inverse breaks on 1e-313 cosines (torchio then
        # returns an all-zero image), which says nothing about our lattice
        ang = draw(
            st.tuples(*[st.floats(-max_angle, max_angle, allow_subnormal=False) for _ in range(3)])
        )
        base = _rotation(ang) @ base
    spacing = np.array(draw(st.tuples(*[st.floats(0.6, 3.5) for _ in range(3)])))
    m = np.eye(4)
    m[:3, :3] = base * spacing
    m[:3, 3] = draw(st.tuples(*[st.floats(-80, 80) for _ in range(3)]))
    shape = tuple(draw(st.integers(6, max_size)) for _ in range(3))
    return m, shape


def _ras_volumes(m: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Three volumes whose voxel value is the voxel's own R, A and S coordinate."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(np.float64)
    ras = ijk @ m[:3, :3].T + m[:3, 3]
    return torch.from_numpy(ras.transpose(3, 0, 1, 2).astype(np.float32))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids())
def test_crop_values_are_the_lattice_ras_positions(grid) -> None:
    m, shape = grid
    lat = geo.Lattice.for_volume(m, shape)
    vols = _ras_volumes(m, shape)
    size = 8
    start = tuple(int(s) // 2 - size // 2 for s in lat.shape)
    idx = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1) + np.array(start)
    expected = lat.lattice_to_ras(idx)
    # which crop voxels lie inside the original volume (continuous index in [-0.5, n-0.5))
    ijk = np.linalg.solve(m, np.c_[expected.reshape(-1, 3), np.ones(size**3)].T).T[:, :3]
    n = np.array(shape[::-1])
    inner = np.all((ijk >= 0) & (ijk <= n - 1), axis=1).reshape((size,) * 3)
    outside = ~np.all((ijk >= -0.5) & (ijk < n - 0.5), axis=1).reshape((size,) * 3)
    for axis in range(3):
        crop = geo.sample_crop(vols[axis][None, None], lat, m, start, size=size).numpy()
        np.testing.assert_allclose(crop[inner], expected[..., axis][inner], atol=2e-3)
        assert np.all(crop[outside] == 0)


@settings(max_examples=30, deadline=None)
@given(grids(max_angle=0.25))
def test_crop_axes_run_along_r_a_s(grid) -> None:
    """Within ~40 degrees of some axis order, lattice axes (dim0, dim1, dim2) ~ (R, A, S);
    (for stronger obliques the assignment is nibabel's, tested above)."""
    m, shape = grid
    lat = geo.Lattice.for_volume(m, shape)
    a = lat.affine[:3, :3] / geo.SPACING
    assert np.allclose(np.linalg.norm(a, axis=0), 1)
    assert np.all(np.argmax(np.abs(a), axis=0) == [0, 1, 2])
    assert np.all(np.diag(a) > 0)


@settings(max_examples=100, deadline=None)
@given(grids())
def test_orientation_rule_matches_nibabel(grid) -> None:
    m, _ = grid
    ornt = nib.orientations.io_orientation(m)
    axis_of_world, sign_of_world = geo.closest_orientation(m[:3, :3])
    for ax in range(3):
        w = int(ornt[ax, 0])
        assert axis_of_world[w] == ax
        assert sign_of_world[w] == int(ornt[ax, 1])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids(max_size=20), st.integers(0, 2**31 - 1))
def test_lattice_and_values_match_torchio(grid, seed) -> None:
    """Resample(1.5) then ToCanonical on the whole volume == our lattice, sampled pointwise."""
    m, shape = grid
    rng = np.random.default_rng(seed)
    data = rng.normal(5, 2, size=shape).astype(np.float32)  # [k, j, i]
    img = torchio.ScalarImage(
        tensor=torch.from_numpy(data.transpose(2, 1, 0).copy())[None], affine=m
    )
    subject = torchio.ToCanonical()(torchio.Resample(1.5)(torchio.Subject(image=img)))
    ref = subject.image.data[0].numpy()
    lat = geo.Lattice.for_volume(m, shape)
    assert lat.shape == ref.shape
    np.testing.assert_allclose(lat.affine, subject.image.affine, atol=1e-9)
    crop = geo.sample_crop(
        torch.from_numpy(data)[None, None], lat, m, (0, 0, 0), size=max(ref.shape) + 2
    ).numpy()
    np.testing.assert_allclose(crop[: ref.shape[0], : ref.shape[1], : ref.shape[2]], ref, atol=1e-4)


def test_crop_start_centres_like_crop_or_pad() -> None:
    """CropOrPad(128, mask) around one voxel v keeps lattice voxels v-64 .. v+63."""
    m = np.diag([1.5, 1.5, 1.5, 1.0])
    lat = geo.Lattice.for_volume(m, (200, 200, 200))
    v = np.array([100, 90, 80])
    label = torch.zeros(1, 200, 200, 200)
    label[0, v[0], v[1], v[2]] = 1
    subject = torchio.Subject(
        image=torchio.ScalarImage(tensor=label.clone(), affine=m),
        label=torchio.LabelMap(tensor=label, affine=m),
    )
    out = torchio.CropOrPad(128, mask_name="label")(subject)
    start = lat.crop_start(lat.lattice_to_ras(v + 0.3))
    np.testing.assert_allclose(out.image.affine, lat.crop_affine(start))
    assert tuple(np.argwhere(out.label.data[0].numpy())[0]) == (64, 64, 64)


def test_znormalize_matches_torchio_and_guards_constant_crops() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(0, 3, size=(16, 16, 16)).astype(np.float32))
    ref = torchio.ZNormalization(masking_method=lambda t: t > 0)(
        torchio.ScalarImage(tensor=x[None].clone())
    ).data[0]
    torch.testing.assert_close(geo.znormalize(x), ref, atol=1e-5, rtol=1e-5)
    for const in (torch.zeros(8, 8, 8), torch.full((8, 8, 8), 7.0)):
        out = geo.znormalize(const)
        assert torch.isfinite(out).all() and out.abs().max() == 0


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids(max_size=40))
def test_pasted_sphere_lands_at_its_world_position(mode, grid) -> None:
    """A sphere of logits in crop space -> voxels within its world radius on any grid."""
    m, shape = grid
    lat = geo.Lattice.for_volume(m, shape)
    # off the crop centre on purpose: a flipped or permuted crop axis would move it by > 30 mm
    centre_crop = np.array([40.3, 80.0, 57.7])
    vol_centre = lat.ras_to_lattice(m[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2) + m[:3, 3])
    start = tuple(int(x) for x in np.round(vol_centre - centre_crop))
    radius_vox = 6.0  # lattice voxels = 9 mm
    # low-res knots sit at crop index 4q + 1.5; logits = signed distance (in crop voxels)
    q = np.arange(geo.LOWRES) * 4 + 1.5
    d = np.sqrt(sum(g**2 for g in np.meshgrid(*(q - c for c in centre_crop), indexing="ij")))
    low = torch.from_numpy((radius_vox - d).astype(np.float32))[None, None]
    field = geo.upsample_logits(low)[None]
    region = tuple(slice(0, n) for n in shape)
    logits = geo.sample_field(field, start, lat, m, region, mode)[0].numpy()
    inside_fp = geo.footprint(lat, m, region, [start], torch.device("cpu"))
    mask = logits > 0 if inside_fp is None else (logits > 0) & inside_fp.numpy()
    centre_ras = lat.lattice_to_ras(np.array(start) + centre_crop)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = np.stack([i, j, k], -1) @ m[:3, :3].T + m[:3, 3]
    dist = np.linalg.norm(ras - centre_ras, axis=-1)
    r_mm = radius_vox * geo.SPACING
    # tolerance: trilinear interpolation of a distance field sampled every 4 lattice voxels,
    # plus up to half a lattice diagonal for nearest sampling
    tol = geo.SPACING * (1.0 if mode == "linear" else 1.9)
    assert np.any(dist < r_mm - tol)
    assert np.all(mask[dist < r_mm - tol])
    assert not np.any(mask[dist > r_mm + tol])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids(max_size=16), st.integers(0, 2**31 - 1))
def test_corner_anchor_matches_pre_2025_torchio(grid, seed) -> None:
    """anchor="corner": the grid older torchio's Resample(1.5) built (ceil voxels, outer corners
    aligned), rebuilt here with SimpleITK, then ToCanonical."""
    sitk = pytest.importorskip("SimpleITK")
    from torchio.data.io import nib_to_sitk, sitk_to_nib

    m, shape = grid
    data = np.random.default_rng(seed).normal(5, 2, size=shape).astype(np.float32)
    src = nib_to_sitk(torch.from_numpy(data.transpose(2, 1, 0).copy())[None], m)
    old_sp, new_sp = np.array(src.GetSpacing()), np.full(3, 1.5)
    size = np.ceil(np.array(src.GetSize()) * old_sp / new_sp).astype(int)
    ref = sitk.Image(size.tolist(), src.GetPixelID())
    ref.SetDirection(src.GetDirection())
    ref.SetSpacing(new_sp.tolist())
    first = (0.5 * (new_sp / old_sp - 1)).tolist()
    ref.SetOrigin(src.TransformContinuousIndexToPhysicalPoint(first))
    arr, aff = sitk_to_nib(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    can = torchio.ToCanonical()(torchio.ScalarImage(tensor=torch.as_tensor(arr), affine=aff))
    lat = geo.Lattice.for_volume(m, shape, anchor="corner")
    assert lat.shape == can.spatial_shape
    np.testing.assert_allclose(lat.affine, can.affine, atol=1e-6)
    crop = geo.sample_crop(
        torch.from_numpy(data)[None, None], lat, m, (0, 0, 0), size=max(lat.shape) + 1
    ).numpy()
    n0, n1, n2 = lat.shape
    np.testing.assert_allclose(crop[:n0, :n1, :n2], can.data[0].numpy(), atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(grids(max_size=30), st.tuples(*[st.integers(-140, 20) for _ in range(3)]))
def test_footprint_box_equals_the_pointwise_footprint(grid, start) -> None:
    m, shape = grid
    lat = geo.Lattice.for_volume(m, shape)
    region = tuple(slice(0, n) for n in shape)
    box = geo.footprint_box(lat, m, region, start)
    got = np.zeros(shape, bool)
    got[box] = True
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64)
    c = lat.ras_to_lattice(ijk @ m[:3, :3].T + m[:3, 3]) - np.array(start)
    inside = np.all((c >= -0.5) & (c < geo.CROP - 0.5), axis=1).reshape(shape)
    # voxel centres exactly on a crop face are decided by rounding; do not judge those
    tie = np.any(
        np.isclose(c, -0.5, atol=1e-9) | np.isclose(c, geo.CROP - 0.5, atol=1e-9), axis=1
    ).reshape(shape)
    np.testing.assert_array_equal(got[~tie], inside[~tie])
