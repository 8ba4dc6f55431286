"""`fastsam3d segment`: prompts in, mask with the image's geometry out; plain errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastsam3d.cli import main
from fastsam3d.commands import segment
from fastsam3d.volume import Volume

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("matplotlib")


@pytest.fixture()
def image(tmp_path):
    k, j, i = np.meshgrid(np.arange(20), np.arange(22), np.arange(24), indexing="ij")
    arr = (100 * np.exp(-((i - 12) ** 2 + (j - 11) ** 2 + (k - 10) ** 2) / 40)).astype(np.float32)
    m = np.diag([-2.0, -2.0, 2.5, 1.0])  # stored LPS-like
    m[:3, 3] = [20.0, 30.0, -10.0]
    vol = Volume(arr, m)
    path = tmp_path / "img.nrrd"
    vol.write(path)
    return path, vol


def test_parsers() -> None:
    assert segment.parse_point("1,2.5,-3") == ([1.0, 2.5, -3.0], True)
    assert segment.parse_point("1,2,3:-") == ([1.0, 2.0, 3.0], False)
    assert segment.parse_point("1,2,3:+", lps=True) == ([-1.0, -2.0, 3.0], True)
    assert segment.parse_box("5,0,0,1,2,3") == ([1.0, 0.0, 0.0], [5.0, 2.0, 3.0])
    for bad in ("1,2", "1,2,x", "1,2,3:?", "nan,1,2"):
        with pytest.raises(ValueError):
            segment.parse_point(bad)


def test_segment_writes_mask_on_the_image_grid_and_a_preview(image, tmp_path, capsys) -> None:
    path, vol = image
    centre = vol.ijk_to_ras_points([12, 11, 10])
    prompts = tmp_path / "p.json"
    lps = [-centre[0], -centre[1], centre[2]]
    prompts.write_text(json.dumps({"space": "LPS", "points": [{"lps": lps, "positive": False}]}))
    out, png = tmp_path / "mask.nii.gz", tmp_path / "preview.png"
    rc = main(
        [
            "segment",
            str(path),
            "--point",
            ",".join(map(str, centre)),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--preview",
            str(png),
            "--fixture-weights",
            "--max-crops",
            "1",
            "--label",
            "4",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "NOT a segmentation" in err and "click 2/2 -" in err
    written = Volume.read(out)
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.ijk_to_ras, vol.ijk_to_ras, atol=1e-5)
    assert set(np.unique(written.array)) <= {0, 4}
    assert png.stat().st_size > 10_000


def test_no_weights_says_how_to_get_them(image, tmp_path, monkeypatch, capsys) -> None:
    from fastsam3d import hub

    path, vol = image
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))

    def offline(*a, **k):
        raise hub.DownloadError("no network")

    monkeypatch.setattr(hub, "download", offline)
    rc = main(["segment", str(path), "--point", "0,0,0", "--out", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err
    assert rc == segment.EXIT_NO_WEIGHTS
    assert "fastsam3d download fastsam3d" in err and "--checkpoint PATH" in err
    assert not (tmp_path / "m.nii.gz").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no prompt"),
        (["--point", "1,2"], "three finite numbers"),
        (["--point", "0,0,0", "--checkpoint", "/nonexistent.pth"], "no such file"),
        (["--box", "1,2,3"], "six numbers"),
    ],
)
def test_usage_errors(image, tmp_path, capsys, extra, message) -> None:
    path, _ = image
    rc = main(["segment", str(path), "--out", str(tmp_path / "m.nii.gz"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_refuses_to_overwrite_the_input_and_reports_bad_clicks(image, tmp_path, capsys) -> None:
    path, _ = image
    before = path.read_bytes()
    assert main(["segment", str(path), "--point", "0,0,0", "--out", str(path)]) == 2
    assert path.read_bytes() == before
    rc = main(
        [
            "segment",
            str(path),
            "--point",
            "900,0,0",
            "--out",
            str(tmp_path / "m.nrrd"),
            "--fixture-weights",
        ]
    )
    assert rc == 1 and "outside the volume" in capsys.readouterr().err


def test_checkpoint_path_gives_the_same_mask_as_the_model_it_holds(image, tmp_path) -> None:
    """--checkpoint PATH (an official-format file) runs exactly the network saved in it."""
    from fastsam3d.checkpoint import save_official
    from fastsam3d.testing import fixture_model

    path, vol = image
    ckpt = tmp_path / "FastSAM3D.pth"
    save_official(fixture_model("fastsam3d"), ckpt)
    point = ",".join(map(str, vol.ijk_to_ras_points([12, 11, 10])))
    outs = []
    for extra in (["--checkpoint", str(ckpt)], ["--fixture-weights"]):
        out = tmp_path / f"m{len(outs)}.nii.gz"
        assert (
            main(
                [
                    "segment",
                    str(path),
                    "--point",
                    point,
                    "--out",
                    str(out),
                    "-q",
                    "--max-crops",
                    "1",
                    *extra,
                ]
            )
            == 0
        )
        outs.append(Volume.read(out).array)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert outs[0].any()


def test_checkpoint_named_like_a_registry_entry_is_the_file(image, tmp_path, monkeypatch) -> None:
    """--checkpoint always names a file: one called 'fastsam3d' in the working directory is
    read, never taken for the registry weights (which are not cached here)."""
    from fastsam3d.checkpoint import save_official
    from fastsam3d.testing import fixture_model

    path, vol = image
    monkeypatch.setenv("FASTSAM3D_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    save_official(fixture_model("fastsam3d"), tmp_path / "fastsam3d")
    point = ",".join(map(str, vol.ijk_to_ras_points([12, 11, 10])))
    assert (
        main(
            [
                "segment",
                str(path),
                "--point",
                point,
                "--out",
                "m.nii.gz",
                "-q",
                "--max-crops",
                "1",
                "--checkpoint",
                "fastsam3d",
            ]
        )
        == 0
    )
    assert Volume.read(tmp_path / "m.nii.gz").array.any()
