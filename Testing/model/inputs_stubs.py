"""Small broken and valid inputs, generated in the test (no downloads), shared by the
test_inputs_* suites (issue 11: a correct result or a clear refusal, and nothing lost)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from fastsam3d.volume import Volume


def blob_volume(affine: np.ndarray | None = None) -> Volume:
    """A 20x22x24 Gaussian blob (no zero voxels), 2 mm voxels stored LPS-like."""
    k, j, i = np.meshgrid(np.arange(20), np.arange(22), np.arange(24), indexing="ij")
    arr = 1 + 100 * np.exp(-((i - 12) ** 2 + (j - 11) ** 2 + (k - 10) ** 2) / 40)
    if affine is None:
        affine = np.diag([-2.0, -2.0, 2.5, 1.0])
        affine[:3, 3] = [20.0, 30.0, -10.0]
    return Volume(arr.astype(np.float32), affine)


def centre_point(vol: Volume) -> str:
    """The blob's centre as a --point value."""
    return ",".join(f"{v:.3f}" for v in vol.ijk_to_ras_points([12, 11, 10]))


def write_series(
    folder: Path,
    positions: Iterable[float],
    *,
    uid: str = "1.2.826.0.1.3680043.2.1125.7",
    orientation: dict[int, str] | None = None,
    localizer: Iterable[int] = (),
    description: str = "",
    first: int = 0,
) -> Path:
    """A DICOM CT series of 8x9 slices at z = ``positions`` (mm), written with SimpleITK.

    ``orientation`` overrides Image Orientation (Patient) of some slices, ``localizer`` marks
    some slices' Image Type as LOCALIZER."""
    sitk = pytest.importorskip("SimpleITK")
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    localizer = set(localizer)
    for n, z in enumerate(positions):
        sl = sitk.GetImageFromArray(np.full((8, 9), 10 * (n + 1), np.int16))
        sl.SetSpacing((0.7, 0.7))
        tags = [
            ("0020|0032", f"5\\6\\{z}"),
            ("0020|0037", (orientation or {}).get(n, "1\\0\\0\\0\\1\\0")),
            ("0020|0013", str(n + 1)),
            ("0020|000e", uid),
            ("0008|0060", "CT"),
            ("0008|103e", description),
        ]
        if n in localizer:
            tags.append(("0008|0008", "ORIGINAL\\PRIMARY\\LOCALIZER"))
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{first + n:03d}.dcm"))
        writer.Execute(sl)
    return folder


def listing(folder: Path) -> list[str]:
    """Every entry below ``folder`` (hidden temporaries included), for 'nothing written'."""
    return sorted(
        os.path.relpath(os.path.join(r, f), folder)
        for r, ds, fs in os.walk(folder)
        for f in fs + ds
    )


@pytest.fixture()
def no_model(monkeypatch):
    """Fail loudly if the CLI gets as far as loading a model (refusals must come first)."""
    from fastsam3d.commands import segment

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(segment, "load_network", refuse)
