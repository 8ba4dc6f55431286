"""Volume: geometry from every reader agrees, and bad input is refused with a clear message."""

from __future__ import annotations

import numpy as np
import pytest

from fastsam3d.volume import Volume, VolumeError

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")


def _oblique_affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    m = np.eye(4)
    m[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, -1.1, 2.5])
    m[:3, 3] = [10.0, -20.0, 30.0]
    return m


def test_sitk_round_trip_converts_lps_to_ras_once(tmp_path) -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    vol = Volume(arr, _oblique_affine())
    path = tmp_path / "v.nrrd"
    vol.write(path)
    back = Volume.read(path)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-5)
    # SimpleITK itself reports LPS: x and y of the origin are negated
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.GetOrigin(), [-10.0, 20.0, 30.0], atol=1e-5)


def test_nifti_read_matches_nibabel_geometry(tmp_path) -> None:
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)  # (i, j, k)
    m = _oblique_affine()
    nib.save(nib.Nifti1Image(data, m), str(tmp_path / "v.nii.gz"))
    vol = Volume.read(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(vol.array, data.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.ijk_to_ras, m, atol=1e-4)
    # the position of a voxel agrees between the two conventions
    np.testing.assert_allclose(
        vol.ijk_to_ras_points([3, 2, 1]), m[:3, :3] @ [3, 2, 1] + m[:3, 3], atol=1e-4
    )


def test_dicom_folder_is_read_as_one_volume(tmp_path) -> None:
    arr = (np.arange(3 * 8 * 9).reshape(3, 8, 9) % 200).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.7, 2.0))
    img.SetOrigin((5.0, 6.0, 7.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr.shape[0]):
        sl = img[:, :, z]
        pos = img.TransformIndexToPhysicalPoint((0, 0, z))
        sl.SetMetaData("0020|0032", "\\".join(map(str, pos)))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(tmp_path / f"s{z:03d}.dcm"))
        writer.Execute(sl)
    vol = Volume.read(tmp_path)
    assert vol.shape == (3, 8, 9)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.spacing, [0.7, 0.7, 2.0], atol=1e-4)
    np.testing.assert_allclose(vol.ijk_to_ras[:3, 3], [-5.0, -6.0, 7.0], atol=1e-4)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((5, 6)), "2D image"),
        (np.zeros((3, 4, 5, 2)), "4D"),
        (np.zeros((3, 1, 5)), "at least 2 voxels"),
        (np.array([[["a"]]]), "real numbers"),
    ],
)
def test_bad_arrays_are_refused(array, message) -> None:
    with pytest.raises(VolumeError, match=message):
        Volume(array, np.eye(4))


def test_non_finite_voxels_are_counted() -> None:
    a = np.ones((4, 4, 4), dtype=np.float32)
    a[0, 0, 0] = np.nan
    a[1, 2, 3] = np.inf
    with pytest.raises(VolumeError, match="2 non-finite"):
        Volume(a, np.eye(4))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.diag([1.0, 1.0, 0.0, 1.0]), "zero spacing"),
        (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "singular"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN or Inf"),
        (np.eye(3), "4x4"),
    ],
)
def test_degenerate_matrices_are_refused(matrix, message) -> None:
    with pytest.raises(VolumeError, match=message):
        Volume(np.zeros((3, 3, 3)), matrix)


def test_vector_and_4d_sitk_images_are_refused() -> None:
    vec = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
    with pytest.raises(VolumeError, match="components"):
        Volume.from_sitk(vec)
    with pytest.raises(VolumeError, match="4D"):
        Volume.from_sitk(sitk.Image([3, 3, 3, 2], sitk.sitkFloat32))
