"""DICOM series, validated before they become a volume (through SimpleITK/GDCM).

A folder of slices is only a volume when its slices share one orientation and one size, are
stacked along their normal and are evenly spaced (no missing slices). ITK reads anything as a
regular grid and at most prints a warning, so a series with a gap, uneven spacing or a stray
orientation would be segmented and written with invented geometry; here it is refused, naming
the slice positions. Localizer (scout) images are left out; a folder with several series names
them and says which one is read (``series=`` picks another).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VolumeError

__all__ = [
    "SeriesInfo",
    "list_series",
    "read_series",
    "describe_series",
    "dicom_hint",
    "SPACING_TOLERANCE",
]

# Slice steps may differ from their median by this fraction of it (and at least 0.01 mm):
# scanners round positions to ~1e-3 mm; a missing slice doubles a step.
SPACING_TOLERANCE = 0.01
_MIN_TOL_MM = 0.01
_WALK_LIMIT = 2000  # folders visited when looking for series below a folder


@dataclass
class _Slice:
    path: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    size: tuple[int, int]
    frames: int
    localizer: bool


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder."""

    uid: str
    description: str
    modality: str
    number: str
    files: list[str] = field(default_factory=list)
    localizers: int = 0

    def label(self) -> str:
        """A one-line description naming the series (UID, number, description, files)."""
        desc = f" '{self.description}'" if self.description else ""
        num = f" #{self.number}" if self.number else ""
        loc = f", {self.localizers} localizer image(s)" if self.localizers else ""
        return f"{self.uid}{num}{desc} ({self.modality or '?'}, {len(self.files)} file(s){loc})"


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ImportError("DICOM needs SimpleITK: pip install SimpleITK") from None
    return sitk


def _tag(reader: Any, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _floats(text: str, n: int) -> np.ndarray | None:
    try:
        v = np.array([float(x) for x in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return v if v.size == n and np.all(np.isfinite(v)) else None


def _read_slice(path: str) -> tuple[_Slice, Any]:
    sitk = _sitk()
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.LoadPrivateTagsOff()
    r.ReadImageInformation()
    size = r.GetSize()
    frames = int(_tag(r, "0028|0008") or (size[2] if len(size) > 2 else 1) or 1)
    image_type = _tag(r, "0008|0008").upper()
    return _Slice(
        path=path,
        position=_floats(_tag(r, "0020|0032"), 3),
        orientation=_floats(_tag(r, "0020|0037"), 6),
        size=(size[0], size[1]),
        frames=frames,
        localizer="LOCALIZER" in image_type,
    ), r


def _series_ids(folder: str | os.PathLike) -> list[str]:
    """GDCM's series UIDs in one folder, without ITK's "No Series were found" console warning."""
    sitk = _sitk()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM series directly in ``folder`` (not its subfolders), largest first."""
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    out = []
    for uid in _series_ids(folder):
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        _, r = _read_slice(files[0])
        out.append(
            SeriesInfo(
                uid=uid,
                description=_tag(r, "0008|103e"),
                modality=_tag(r, "0008|0060"),
                number=_tag(r, "0020|0011"),
                files=files,
            )
        )
    out.sort(key=lambda s: -len(s.files))
    return out


def describe_series(series: list[SeriesInfo]) -> str:
    """The series as indented lines, numbered from 1 (the numbers ``series=`` accepts)."""
    return "\n".join(f"  {n}. {s.label()}" for n, s in enumerate(series, 1))


def _series_below(folder: Path) -> list[Path]:
    found = []
    for n, (root, dirs, _files) in enumerate(os.walk(folder)):
        dirs.sort()
        if n >= _WALK_LIMIT or len(found) >= 20:
            break
        if Path(root) != folder and _series_ids(root):
            found.append(Path(root))
    return found


def _pick(folder: Path, series: list[SeriesInfo], choice: str | None) -> SeriesInfo:
    listing = describe_series(series)
    if choice is not None:
        for n, s in enumerate(series, 1):
            if choice in (s.uid, str(n)):
                return s
        raise VolumeError(
            f"{folder}: no series {choice!r}; it holds:\n{listing}\n"
            "(give a series UID or its number in this list)"
        )
    if len(series) == 1:
        return series[0]
    if len(series[0].files) == len(series[1].files):
        raise VolumeError(
            f"{folder} holds {len(series)} DICOM series and more than one is the "
            f"largest:\n{listing}\nchoose one with --series UID (or its number "
            "in this list)"
        )
    warnings.warn(
        f"{folder} holds {len(series)} DICOM series:\n{listing}\nreading 1 (the one "
        "with the most files); choose another with --series UID (or its number)",
        stacklevel=4,
    )
    return series[0]


def _check_geometry(folder: Path, info: SeriesInfo, slices: list[_Slice]) -> list[str]:
    """The files of a volume, sorted along the slice normal, or VolumeError saying why not."""
    name = f"{folder} (series {info.uid})"
    if any(s.position is None or s.orientation is None for s in slices):
        bad = next(s.path for s in slices if s.position is None or s.orientation is None)
        raise VolumeError(
            f"{name}: {Path(bad).name} has no usable Image Position/Orientation "
            "(Patient); the slices cannot be placed in space"
        )
    sizes = sorted({s.size for s in slices})
    if len(sizes) > 1:
        raise VolumeError(f"{name}: the slices have different sizes {sizes}; not one volume")
    o0 = slices[0].orientation
    odd = [s for s in slices if not np.allclose(s.orientation, o0, atol=1e-4)]
    if odd:
        kinds = 1 + len({tuple(np.round(s.orientation, 4)) for s in odd})
        raise VolumeError(
            f"{name}: the slices have {kinds} different orientations (e.g. "
            f"{Path(slices[0].path).name}: "
            f"{np.round(o0, 4).tolist()}, {Path(odd[0].path).name}: "
            f"{np.round(odd[0].orientation, 4).tolist()}): a localizer or "
            "multi-planar series, not one volume"
        )
    normal = np.cross(o0[:3], o0[3:])
    d = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(d, kind="stable")
    slices = [slices[i] for i in order]
    d = d[order]
    pos = ", ".join(f"{v:.2f}" for v in d[:24]) + (", ..." if d.size > 24 else "")
    steps = np.diff(d)
    if np.any(steps <= _MIN_TOL_MM):
        i = int(np.argmax(steps <= _MIN_TOL_MM))
        raise VolumeError(
            f"{name}: {Path(slices[i].path).name} and "
            f"{Path(slices[i + 1].path).name} are at the same position "
            f"({d[i]:.2f} mm along the slice normal): several images per "
            "position (echoes, phases, repeats) are not one volume"
        )
    step = float(np.median(steps))
    tol = max(_MIN_TOL_MM, SPACING_TOLERANCE * step)
    bad = np.flatnonzero(np.abs(steps - step) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = steps[i] / step
        gap = ratio > 1.5 and abs(ratio - round(ratio)) < 0.1
        what = f"about {round(ratio) - 1} missing slice(s)" if gap else "uneven spacing"
        raise VolumeError(
            f"{name}: {what}: the slices are not evenly spaced (step "
            f"{step:.3g} mm, but {steps[i]:.3g} mm between {d[i]:.2f} and "
            f"{d[i + 1]:.2f} mm); slice positions along the normal: {pos}. "
            "A volume read from it would have wrong geometry"
        )
    inplane = np.array([s.position - (s.position @ normal) * normal for s in slices])
    drift = float(np.max(np.linalg.norm(inplane - inplane[0], axis=1)))
    if drift > max(tol, 0.05):
        raise VolumeError(
            f"{name}: the slices are not stacked along their normal (in-plane "
            f"drift up to {drift:.2f} mm: a gantry tilt or sheared stack); "
            "resample it to an orthogonal grid first"
        )
    return [s.path for s in slices]


def read_series(folder: str | os.PathLike, series: str | None = None) -> Any:
    """The SimpleITK image of one validated series in ``folder``; VolumeError with a hint for a
    folder without series (naming subfolders that hold some), several equally large series, or
    a series that is not a regular volume."""
    sitk = _sitk()
    folder = Path(folder)
    found = list_series(folder)
    if not found:
        below = _series_below(folder)
        if below:
            names = "\n".join(f"  {p}" for p in below[:10])
            raise VolumeError(
                f"folder {folder} holds no DICOM series itself; series were found "
                f"in its subfolders:\n{names}\npass one of those folders"
            )
        dicomdir = (
            " (it holds a DICOMDIR index but no image files)"
            if any(p.name.upper() == "DICOMDIR" for p in folder.iterdir())
            else ""
        )
        raise VolumeError(f"folder {folder} holds no DICOM series{dicomdir}, nor do its subfolders")
    candidates = []
    for s in found:
        slices = [_read_slice(f)[0] for f in s.files]
        s.localizers = sum(sl.localizer for sl in slices)
        if s.localizers < len(slices):
            candidates.append((s, [sl for sl in slices if not sl.localizer]))
    if not candidates:
        raise VolumeError(
            f"{folder}: every series is a localizer (scout) series:\n"
            f"{describe_series(found)}\nlocalizers are not volumes"
        )
    chosen = _pick(folder, [c[0] for c in candidates], series)
    slices = dict((c[0].uid, c[1]) for c in candidates)[chosen.uid]
    if chosen.localizers:
        warnings.warn(
            f"{folder}: left out {chosen.localizers} localizer image(s) of series {chosen.uid}",
            stacklevel=3,
        )
    if len(slices) == 1:
        if slices[0].frames > 1:  # one multi-frame (enhanced) file: ITK places its frames
            return sitk.ReadImage(slices[0].path)
        raise VolumeError(
            f"{folder}: series {chosen.uid} has a single slice; a 3D volume needs the whole series"
        )
    files = _check_geometry(folder, chosen, slices)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def dicom_hint(path: str | os.PathLike) -> str | None:
    """A hint when a single file is a DICOMDIR index or a DICOM file of a series (pass the
    folder instead), else None."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    is_dicom = head[128:132] == b"DICM"
    if p.name.upper() == "DICOMDIR":
        return (
            f"{p} is a DICOMDIR index, not an image: pass the folder that holds the image "
            f"files of one series (look in the subfolders of {p.parent})"
        )
    if is_dicom:
        return (
            f"{p} is one DICOM file; pass the folder holding the whole series "
            f"({p.parent}) to read it as a volume"
        )
    return None
