"""Writing rules (issue 11): every output written atomically beside its destination and only
when complete, never over an input (same inode included), refused up front when the format
cannot hold the 3D geometry; modes follow the umask; arguments checked before any work.

Every case here misbehaved on main @ 2b0bdb6 (reviews/reliability.md #1, #4, #7, #18, #22;
reviews/newcomer.md m7, m13)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from inputs_stubs import blob_volume, centre_point, listing, no_model  # noqa: F401

from fastsam3d.atomic import atomic_path
from fastsam3d.cli import main
from fastsam3d.volume import Volume

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")


@pytest.fixture()
def image(tmp_path):
    vol = blob_volume()
    path = tmp_path / "img.nii.gz"
    vol.write(path)
    return path, vol


def _segment(path, vol, out, *extra):
    return main(
        ["segment", str(path), "--point", centre_point(vol), "--out", str(out), "-q", *extra]
    )


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("name", ["m.png", "m.tif", "m.vtk", "m.txt", "m.npy", "m"])
def test_output_formats_that_lose_the_geometry_are_refused_up_front(image, tmp_path, capsys, name):
    """reliability #4 (.png/.tif/.vtk written flipped or 2D, exit 0) and #22 (.txt, .npy, no
    suffix failing only after the whole run)."""
    path, vol = image
    before = listing(tmp_path)
    assert _segment(path, vol, tmp_path / name) == 2
    err = capsys.readouterr().err
    assert "cannot write a 3D mask" in err and ".nii.gz" in err
    assert listing(tmp_path) == before


def test_upper_case_nifti_suffix_is_written(image, tmp_path):
    """reliability #22: ITK's "Bad Nifti file name" after the whole run."""
    path, vol = image
    name = "m.NII.GZ"
    assert _segment(path, vol, tmp_path / name, "--fixture-weights", "--max-crops", "1") == 0
    back = Volume.read(tmp_path / name)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert back.array.any()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporaries left"


@pytest.mark.usefixtures("no_model")
def test_out_that_is_a_hard_link_to_the_input_is_refused(image, tmp_path, capsys):
    """reliability #7: a hard link to the input was overwritten with the mask."""
    path, vol = image
    alias = tmp_path / "alias.nii.gz"
    os.link(path, alias)
    before = path.read_bytes()
    assert _segment(path, vol, alias) == 2
    assert "is the input" in capsys.readouterr().err
    assert path.read_bytes() == before and alias.read_bytes() == before


@pytest.mark.usefixtures("no_model")
def test_out_inside_a_dicom_folder_as_one_of_its_files_is_refused(tmp_path, capsys):
    from inputs_stubs import write_series

    folder = write_series(tmp_path / "series", [0, 2, 4])
    target = folder / "s001.dcm"
    before = target.read_bytes()
    rc = main(
        [
            "segment",
            str(folder),
            "--point",
            "-8,-9,2",
            "--out",
            str(folder / "x.nrrd"),
            "--preview",
            str(target),
        ]
    )
    assert rc == 2 and "is the input" in capsys.readouterr().err
    assert target.read_bytes() == before


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preview", "{out}"], "--preview and --out are the same file"),
        (["--preview", "{tmp}/missing/p.png"], "does not exist"),
        (["--preview", "{tmp}/p.jpg"], "name it *.png"),
        (["--label", "0"], "--label 0: must be 1..65535"),
        (["--label", "70000"], "must be 1..65535"),
        (["--label", "-40000"], "must be 1..65535"),
        (["--max-crops", "0"], "--max-crops 0: must be at least 1"),
        (["--device", "gpu"], "expected auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_options_are_refused_before_reading_or_loading(image, tmp_path, capsys, extra, message):
    """reliability #22 / newcomer m7: these failed after the whole run, wrote an all-zero mask
    (--label 0) or overwrote the mask with the PNG (--preview = --out)."""
    path, vol = image
    out = tmp_path / "m.nii.gz"
    extra = [e.format(out=out, tmp=tmp_path) for e in extra]
    before = listing(tmp_path)
    assert _segment(path, vol, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert listing(tmp_path) == before


@pytest.mark.usefixtures("no_model")
def test_out_that_is_a_folder_is_refused_up_front(image, tmp_path, capsys):
    path, vol = image
    (tmp_path / "d.nii.gz").mkdir()
    assert _segment(path, vol, tmp_path / "d.nii.gz") == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.usefixtures("no_model")
def test_click_outside_is_refused_before_the_model_loads_with_the_extent_and_an_lps_hint(
    image, tmp_path, capsys
):
    """reliability #22 (refused only after 24 s of model building), newcomer p4."""
    path, vol = image
    r, a, s = vol.ijk_to_ras_points([22, 11, 10])  # inside; (-r, -a, s) is not
    assert vol.contains([r, a, s]) and not vol.contains([-r, -a, s])
    rc = main(
        ["segment", str(path), "--point", f"{-r},{-a},{s}", "--out", str(tmp_path / "m.nii.gz")]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "outside the volume (extent RAS mm: R " in err and "add --lps" in err


def test_failed_write_keeps_the_previous_file_and_leaves_nothing(image, tmp_path, monkeypatch):
    path, vol = image
    out = tmp_path / "m.nii.gz"
    vol.write(out, np.ones(vol.shape, np.uint8))
    before, names = out.read_bytes(), listing(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        vol.write(out, np.zeros(vol.shape, np.uint8))
    assert out.read_bytes() == before and listing(tmp_path) == names


def test_full_disk_gives_nonzero_exit_and_keeps_the_previous_mask(tmp_path):
    """reliability #1: a short write (ITK's NIfTI writer only prints 'wrote only N bytes')
    truncated the mask, replaced the previous good one and exited 0. The disk is 'full' here
    through RLIMIT_FSIZE: writes past 4 KiB fail, as on a full filesystem."""
    pytest.importorskip("resource")
    vol = blob_volume()
    vol.write(tmp_path / "img.nii")
    out = tmp_path / "m.nii"
    vol.write(out, np.full(vol.shape, 7, np.uint8))  # the previous good mask (10 KiB)
    before = out.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from fastsam3d.cli import main
        sys.exit(main(["segment", {str(tmp_path / "img.nii")!r}, "--point",
                       {centre_point(vol)!r}, "--out", {str(out)!r}, "--fixture-weights",
                       "--max-crops", "1", "-q"]))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    assert "m.nii" in proc.stderr and "File too large" in proc.stderr
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["img.nii", "m.nii"]


def test_atomic_files_follow_the_umask(tmp_path):
    """reliability #18 / newcomer m13: atomic writes (checkpoint export, convert, hashes.json)
    were 0600 whatever the umask."""
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
        blob_volume().write(tmp_path / "v.nhdr")  # header + companion data file
    finally:
        os.umask(old)
    names = sorted(os.listdir(tmp_path))
    assert names == ["a.bin", "v.nhdr", "v.raw.gz"], "no temporaries left"
    for name in names:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert Volume.read(tmp_path / "v.nhdr").shape == blob_volume().shape


def test_preview_fills_a_mask_that_reaches_the_slice_edge(tmp_path):
    """newcomer p1: only outlines were drawn, so a mask covering a slice showed nothing."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from fastsam3d.preview import save_preview

    vol = blob_volume()
    png = tmp_path / "p.png"
    save_preview(
        vol, np.ones(vol.shape, bool), png, points=[(vol.ijk_to_ras_points([12, 11, 10]), True)]
    )
    rgb = imread(str(png))[..., :3]
    reddish = (rgb[..., 0] > rgb[..., 1] + 0.25) & (rgb[..., 0] > rgb[..., 2] + 0.25)
    assert reddish.mean() > 0.15, "the mask is not filled"


@pytest.mark.usefixtures("no_model")
def test_click_outside_the_box_is_refused_up_front(image, tmp_path, capsys):
    """newcomer m8: the session's 'reset() or add a new box' reached CLI users (who have no
    reset) after the model had loaded."""
    path, vol = image
    r, a, s = vol.ijk_to_ras_points([12, 11, 10])
    rc = main(
        [
            "segment",
            str(path),
            "--box",
            f"{r - 5},{a - 5},{s - 5},{r + 5},{a + 5},{s + 5}",
            "--point",
            f"{r + 8},{a},{s}",
            "--out",
            str(tmp_path / "m.nii.gz"),
        ]
    )
    assert rc == 1
    assert "outside the box" in capsys.readouterr().err


@pytest.mark.usefixtures("no_model")
def test_a_path_given_to_model_points_to_checkpoint(image, tmp_path, capsys):
    """newcomer m2: `--model ./FastSAM3D.pth` said 'unknown weights name' without a hint."""
    path, vol = image
    rc = main(
        [
            "segment",
            str(path),
            "--point",
            centre_point(vol),
            "--out",
            str(tmp_path / "m.nii.gz"),
            "--model",
            "./FastSAM3D.pth",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "use --checkpoint ./FastSAM3D.pth" in err and "reading" not in err


def test_preview_is_written_without_torch(tmp_path):
    """`segment --preview` in a torch-free install (`fastsam3d[onnx,io]`, or a `--server` client)
    wrote the mask, then failed on `No module named 'torch'`: preview.py took
    closest_orientation from the torch geometry module instead of the numpy lattice."""
    pytest.importorskip("matplotlib")
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from inputs_stubs import blob_volume
        from fastsam3d.preview import save_preview
        vol = blob_volume()
        save_preview(vol, np.ones(vol.shape, bool), {str(tmp_path / "p.png")!r})
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "p.png").stat().st_size > 1000
