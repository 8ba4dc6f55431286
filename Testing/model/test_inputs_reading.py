"""Reading rules (issue 11): one geometry rule for NIfTI whatever is installed, truncated or
corrupt files refused, DICOM series validated, sheared affines kept exactly.

Every case here misbehaved on main @ 2b0bdb6 (reviews/newcomer.md M1, M2, m6, p3;
reviews/reliability.md #2, #5, #6, #21, #25)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from inputs_stubs import blob_volume, centre_point, listing, no_model, write_series  # noqa: F401

from fastsam3d.cli import main
from fastsam3d.volume import Volume, VolumeError

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")


def _disagreeing_nifti(path, shift=(0.0, 112.0, 50.0)):
    """Like mricron-data's natbrainlab.nii.gz: qform (code 2) and sform (code 2) differ by a
    translation; nibabel, FSL, MRIcron and nilearn use the sform."""
    data = np.random.default_rng(0).random((24, 22, 20)).astype(np.float32) + 1
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform[:3, 3] = [78.0, -112.0, -50.0]
    qform = sform.copy()
    qform[:3, 3] += shift
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=2)
    img.set_sform(sform, code=2)
    nib.save(img, str(path))
    return sform, qform


def _read_without_simpleitk(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK -> ImportError
        return Volume.read(path)


def test_nifti_geometry_is_nibabels_rule_and_the_disagreement_is_named(tmp_path, monkeypatch):
    path = tmp_path / "nb.nii.gz"
    sform, _ = _disagreeing_nifti(path)
    with pytest.warns(
        UserWarning,
        match=r"sform .*qform .*disagree by up to 12[23]\.\d mm; "
        r"using the sform",
    ):
        vol = Volume.read(path)
    np.testing.assert_allclose(vol.ijk_to_ras, nib.load(str(path)).affine, atol=1e-5)
    np.testing.assert_allclose(vol.ijk_to_ras, sform, atol=1e-5)
    # the same geometry and voxels when only nibabel is installed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = _read_without_simpleitk(path, monkeypatch)
    np.testing.assert_array_equal(alone.ijk_to_ras, vol.ijk_to_ras)
    np.testing.assert_array_equal(alone.array, vol.array)


def test_scales_that_disagree_read_the_same_with_either_reader(tmp_path, monkeypatch):
    """reliability #21: sform diag(1,1,2) code 2, qform diag(3,3,3) code 1."""
    img = nib.Nifti1Image(np.ones((6, 5, 4), np.float32), None)
    img.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), code=1)
    img.set_sform(np.diag([1.0, 1.0, 2.0, 1.0]), code=2)
    path = tmp_path / "scales.nii"
    nib.save(img, str(path))
    with pytest.warns(UserWarning, match="disagree"):
        vol = Volume.read(path)
    np.testing.assert_allclose(vol.spacing, [1, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(_read_without_simpleitk(path, monkeypatch).spacing, [1, 1, 2])


def test_click_in_the_sform_frame_is_inside_and_the_mask_keeps_the_header(tmp_path, capsys):
    """newcomer M1 + p3: the click is where every neuroimaging viewer shows it, and the NIfTI
    mask carries the input's sform and qform with their codes (it overlays its image)."""
    path = tmp_path / "nb.nii.gz"
    sform, qform = _disagreeing_nifti(path)
    centre = sform[:3, :3] @ [12, 11, 10] + sform[:3, 3]
    out = tmp_path / "mask.nii.gz"
    rc = main(
        [
            "segment",
            str(path),
            "--point",
            ",".join(map(str, centre)),
            "--out",
            str(out),
            "--fixture-weights",
            "--max-crops",
            "1",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning:" in err and "using the sform" in err and "UserWarning" not in err
    hdr = nib.load(str(out)).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 2)
    np.testing.assert_allclose(hdr.get_sform(), sform, atol=1e-4)
    np.testing.assert_allclose(hdr.get_qform(), qform, atol=1e-4)


def test_nan_voxel_in_a_nifti_is_refused(tmp_path):
    """reliability #21: SimpleITK turned NaN into 0, so the NaN check never fired."""
    data = np.ones((6, 5, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(VolumeError, match="non-finite"):
        Volume.read(tmp_path / "nan.nii.gz")


@pytest.mark.parametrize("name", ["t.nii.gz", "t.nii"])
@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_nifti_is_refused_not_read_with_zeros(tmp_path, name, keep):
    """reliability #2, #25: half the bytes (data cut), or a tenth (cut inside the header)."""
    data = (np.random.default_rng(0).random((20, 30, 40)) * 100 + 1).astype(np.float32)
    full = tmp_path / f"full_{name}"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(full))
    blob = full.read_bytes()
    (tmp_path / name).write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(VolumeError, match="truncated or corrupt"):
        Volume.read(tmp_path / name)


@pytest.mark.usefixtures("no_model")
def test_truncated_input_gives_exit_1_and_writes_nothing(tmp_path, capsys):
    vol = blob_volume()
    vol.write(tmp_path / "img.nii.gz")
    blob = (tmp_path / "img.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    before = listing(tmp_path)
    rc = main(
        [
            "segment",
            str(tmp_path / "cut.nii.gz"),
            "--point",
            centre_point(vol),
            "--out",
            str(tmp_path / "m.nii.gz"),
        ]
    )
    assert rc == 1
    assert "cut.nii.gz is truncated or corrupt" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_truncated_nrrd_and_mha_are_refused(tmp_path):
    vol = blob_volume()
    for name in ("v.nrrd", "v.mha"):
        vol.write(tmp_path / name)
        blob = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(blob[: len(blob) // 2])
        with pytest.raises(VolumeError, match="truncated/corrupt"):
            Volume.read(tmp_path / f"cut_{name}")


# --- sheared affines ------------------------------------------------------------------------


def _sheared(tmp_path):
    m = np.diag([2.0, 2.0, 2.5, 1.0])
    m[0, 1] = 1.0  # i and j axes not perpendicular
    vol = blob_volume(m)
    nib.save(nib.Nifti1Image(vol.array.transpose(2, 1, 0), m), str(tmp_path / "shear.nii.gz"))
    return m, vol


def test_sheared_nifti_mask_gets_exactly_the_inputs_affine(tmp_path, capsys):
    """reliability #5: ITK coerced the direction to orthogonal, moving voxels by 7.8 mm."""
    m, vol = _sheared(tmp_path)
    out = tmp_path / "mask.nii.gz"
    rc = main(
        [
            "segment",
            str(tmp_path / "shear.nii.gz"),
            "--point",
            centre_point(vol),
            "--out",
            str(out),
            "--fixture-weights",
            "--max-crops",
            "1",
            "-q",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_allclose(nib.load(str(out)).affine, m, atol=1e-5)
    np.testing.assert_allclose(Volume.read(out).ijk_to_ras, m, atol=1e-5)


@pytest.mark.usefixtures("no_model")
def test_sheared_image_to_a_format_that_cannot_hold_it_is_refused_up_front(tmp_path, capsys):
    m, vol = _sheared(tmp_path)
    rc = main(
        [
            "segment",
            str(tmp_path / "shear.nii.gz"),
            "--point",
            centre_point(vol),
            "--out",
            str(tmp_path / "mask.nrrd"),
        ]
    )
    assert rc == 2
    assert "sheared" in capsys.readouterr().err
    assert not (tmp_path / "mask.nrrd").exists()
    with pytest.raises(VolumeError, match="sheared"):
        Volume.read(tmp_path / "shear.nii.gz").write(
            tmp_path / "mask.mha", np.zeros(vol.shape, np.uint8)
        )
    assert not (tmp_path / "mask.mha").exists()


# --- DICOM series -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positions", "orientation", "message"),
    [
        ([0, 2, 4, 6, 12, 14, 16], None, r"2 missing slice.*between 6\.00 and 12\.00"),
        ([0, 1, 2, 3.6, 4.6, 5.6], None, r"uneven spacing.*1\.6 mm between 2\.00 and 3\.60"),
        ([0, 2, 4, 6, 8], {2: "0\\1\\0\\0\\0\\1"}, "2 different orientations"),
        ([0, 2, 2, 4, 6], None, "at the same position"),
    ],
    ids=["gap", "uneven", "stray-orientation", "duplicate-position"],
)
def test_irregular_dicom_series_is_refused_naming_the_positions(
    tmp_path, positions, orientation, message
):
    """newcomer M2, reliability #6: read as a regular grid with invented spacing before."""
    folder = write_series(tmp_path / "series", positions, orientation=orientation)
    with pytest.raises(VolumeError, match=message):
        Volume.read(folder)


@pytest.mark.usefixtures("no_model")
def test_irregular_dicom_series_gives_exit_1_and_writes_nothing(tmp_path, capsys):
    folder = write_series(tmp_path / "series", [0, 2, 4, 6, 12, 14, 16])
    rc = main(["segment", str(folder), "--point", "-8,-9,4", "--out", str(tmp_path / "m.nrrd")])
    assert rc == 1
    assert "missing slice" in capsys.readouterr().err
    assert not (tmp_path / "m.nrrd").exists()


def test_localizer_images_are_left_out(tmp_path):
    folder = write_series(
        tmp_path / "series", [0, 2, 4, 6, 8, 30], localizer=[5], orientation={5: "0\\1\\0\\0\\0\\1"}
    )
    with pytest.warns(UserWarning, match="left out 1 localizer"):
        vol = Volume.read(folder)
    assert vol.shape == (5, 8, 9)
    np.testing.assert_allclose(vol.spacing, [0.7, 0.7, 2.0], atol=1e-4)


def test_localizer_only_folder_is_refused(tmp_path):
    folder = write_series(tmp_path / "scout", [0, 2, 4], localizer=[0, 1, 2])
    with pytest.raises(VolumeError, match="localizer"):
        Volume.read(folder)


@pytest.mark.usefixtures("no_model")
def test_several_series_are_named_and_one_can_be_chosen(tmp_path, capsys):
    """newcomer m6 / reliability #25: equal sizes were an arbitrary pick called 'the largest'."""
    folder = tmp_path / "study"
    write_series(folder, [0, 2, 4], uid="1.2.3.1", description="T1")
    write_series(folder, [0, 3, 6], uid="1.2.3.2", description="T2", first=10)
    with pytest.raises(
        VolumeError,
        match=r"(?s)more than one is the largest.*1\.2\.3\.1 #?.*"
        r"'T1'.*1\.2\.3\.2.*'T2'.*--series",
    ):
        Volume.read(folder)
    np.testing.assert_allclose(Volume.read(folder, series="1.2.3.2").spacing[2], 3.0, atol=1e-4)
    write_series(folder, [0, 2, 4, 6], uid="1.2.3.3", description="big", first=20)
    with pytest.warns(UserWarning, match=r"(?s)holds 3 DICOM series.*1\.2\.3\.3.*reading 1"):
        assert Volume.read(folder).shape[0] == 4
    with pytest.raises(VolumeError, match="no series '9.9'"):
        Volume.read(folder, series="9.9")


@pytest.mark.parametrize("kind", ["nested", "single-file", "dicomdir"])
def test_dicom_paths_that_are_not_a_series_folder_get_a_hint(tmp_path, kind):
    folder = write_series(tmp_path / "study" / "patient" / "ct", [0, 2, 4])
    if kind == "nested":
        path, message = tmp_path / "study", r"(?s)subfolders.*patient[/\\]ct.*pass one"
    elif kind == "single-file":
        path, message = folder / "s001.dcm", "pass the folder holding the whole series"
    else:
        path = tmp_path / "study" / "DICOMDIR"
        path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
        message = "DICOMDIR index"
    with pytest.raises(VolumeError, match=message):
        Volume.read(path)


# --- images the engine cannot segment: VolumeError naming the problem -----------------------


@pytest.mark.parametrize(
    ("array", "affine", "message"),
    [
        (np.zeros((3, 3, 3), "m8[s]"), np.eye(4), "real numbers"),
        (np.zeros((3, 3, 3)), np.diag([1e300, 1, 1, 1]), "not a plausible voxel size"),
        (np.zeros((2, 2, 2)), np.diag([0.5, 0.5, 0.5, 1]), "too small an image"),
        (
            np.zeros((10, 10, 10)),
            np.diag([1000.0, 1000.0, 1000.0, 1]),
            "larger than the model's 192 mm crop",
        ),
    ],
    ids=["timedelta", "spacing-1e300", "extent-1mm", "voxels-1000mm"],
)
def test_images_that_cannot_be_segmented_are_volume_errors(array, affine, message):
    """reliability #24, #25: a timedelta array was accepted, 1e300 spacing called 'singular',
    a tiny extent raised a plain ValueError from the lattice, 1000 mm voxels ran 8 crops to an
    empty mask."""
    from fastsam3d.geometry import Lattice

    with pytest.raises(VolumeError, match=message):
        vol = Volume(array, affine)
        Lattice.for_volume(vol.ijk_to_ras, vol.shape)


def test_real_dicom_series_from_pydicom_behave():
    """newcomer M2 / m6 on real (downsampled) CT/MR series shipped in pydicom's wheel."""
    pydicom_data = pytest.importorskip("pydicom.data")
    from pathlib import Path

    root = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests"
    if not root.is_dir():
        pytest.skip("this pydicom build does not ship dicomdirtests")
    vol = Volume.read(root / "98892001" / "CT5N")  # a clean 5-slice axial CT
    assert vol.shape == (5, 16, 16)
    np.testing.assert_allclose(vol.spacing[2], 2.5, atol=1e-3)
    cases = [
        ("77654033/CT2", r"missing slice.*-99\.48, 103\.02, 104\.27, 105\.52"),  # a 200 mm gap
        ("98892003/MR700", "7 different orientations"),  # radial localizer
        ("98892003/MR2", r"(?s)more than one is the largest.*'FAST LOCALIZER'.*--series"),
        ("98892001", r"(?s)subfolders.*CT5N"),
        ("DICOMDIR", "DICOMDIR index"),
    ]
    for path, message in cases:
        with pytest.raises(VolumeError, match=message):
            Volume.read(root / path)
    with pytest.raises(VolumeError, match="different orientations"):
        Volume.read(root / "98892003" / "MR2", series="1")  # the tri-planar pilot
