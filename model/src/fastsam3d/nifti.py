"""NIfTI files, always through nibabel, so their geometry follows one rule whatever else is
installed: the sform when its code is set (> 0), else the qform (nibabel's ``get_best_affine``,
as FSL, MRIcron and nilearn read them). SimpleITK is not used for NIfTI: ITK prefers the qform
in some files whose two forms disagree (real files do this), and zero-fills truncated files.

A mask written for a NIfTI input keeps the input's qform and sform with their codes, so any
reader places the mask where it places the image.
"""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VolumeError

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "read_nifti", "write_nifti", "form_disagreement"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# sform/qform positions closer than this are the same frame (float32 storage is ~1e-5 mm)
_SAME_FRAME_MM = 0.01
_CODES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}


def is_orthogonal(ijk_to_ras: Any, tol: float = 1e-6) -> bool:
    """Whether the matrix's voxel axes are perpendicular (no shear)."""
    a = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    a = a / np.linalg.norm(a, axis=0)
    return bool(np.allclose(a.T @ a, np.eye(3), atol=tol))


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether the name says NIfTI (case-insensitive)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise ImportError(
            "NIfTI files need nibabel (pip install nibabel): fastsam3d reads and "
            "writes every NIfTI file with nibabel so that its geometry follows one "
            "rule (the sform when its code is set, else the qform)"
        ) from None
    return nibabel


def _corners(shape_ijk: tuple[int, ...]) -> np.ndarray:
    n = np.asarray(shape_ijk[:3], dtype=np.float64) - 1
    grid = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    return np.c_[grid * n, np.ones(8)]


def form_disagreement(header: Any) -> float:
    """Largest distance (mm) between where the sform and the qform put the volume's corner
    voxels; 0 when either form is unset (code 0)."""
    if int(header["sform_code"]) <= 0 or int(header["qform_code"]) <= 0:
        return 0.0
    c = _corners(tuple(int(s) for s in header.get_data_shape()[:3]))
    d = c @ (header.get_sform() - header.get_qform()).T
    return float(np.max(np.linalg.norm(d[:, :3], axis=1)))


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(array[k, j, i], ijk_to_ras, header)`` of a 3D NIfTI file.

    Raises VolumeError for a truncated, corrupt or non-3D file; warns when the sform and qform
    disagree (naming which one is used) or when neither is set.
    """
    nib = _nibabel()
    p = Path(path)
    try:
        img = nib.load(str(p), mmap=False)
        proxy = img.dataobj
        if getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0:
            data = np.asanyarray(proxy)  # the stored type (no scaling)
        else:  # scl_slope / scl_inter applied in float32, not nibabel's float64 (half the RAM)
            data = img.get_fdata(dtype=np.float32)
    except (EOFError, zlib.error) as err:
        raise VolumeError(
            f"{p} is truncated or corrupt (the compressed data ends early: {err}); it was not read"
        ) from None
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        reason = str(err).splitlines()[0]
        raise VolumeError(
            f"{p} is not a readable NIfTI file (truncated or corrupt?): {reason}"
        ) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        kind = "4D (time series or vector) data" if data.ndim > 3 else f"{data.ndim}D data"
        raise VolumeError(f"{p} holds {kind} with shape {data.shape}; a 3D scalar image is needed")
    hdr = img.header
    sc, qc = int(hdr["sform_code"]), int(hdr["qform_code"])
    gap = form_disagreement(hdr)
    if gap > _SAME_FRAME_MM:
        warnings.warn(
            f"{p.name}: its sform (code {sc}, {_CODES.get(sc, sc)}) and qform "
            f"(code {qc}, {_CODES.get(qc, qc)}) disagree by up to {gap:.1f} mm; using "
            "the sform, as nibabel, FSL, MRIcron and nilearn do (some ITK-based tools "
            "use the qform and show this image elsewhere)",
            stacklevel=3,
        )
    elif sc <= 0 and qc <= 0:
        warnings.warn(
            f"{p.name}: neither sform nor qform is set (both codes 0): the image has "
            "no orientation; using voxel sizes only (nibabel's fallback)",
            stacklevel=3,
        )
    affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine, hdr


def write_nifti(
    path: str | os.PathLike,
    array_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    header: Any | None = None,
) -> None:
    """Write ``array_kji`` with exactly ``ijk_to_ras`` as its geometry.

    ``header`` (the source image's) supplies the qform/sform and their codes when its best
    affine is ``ijk_to_ras``; otherwise both forms get ``ijk_to_ras`` with code 1 (scanner), and
    a sheared (non-orthogonal) matrix, which a qform cannot hold, is written as the sform alone.
    """
    nib = _nibabel()
    data = np.ascontiguousarray(np.asarray(array_kji).transpose(2, 1, 0))
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, None)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    img.header.set_zooms(tuple(np.linalg.norm(m[:3, :3], axis=0)))
    if header is not None and np.allclose(header.get_best_affine(), m, atol=1e-4):
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
        img.header.set_xyzt_units(*header.get_xyzt_units())
    else:
        if is_orthogonal(m):
            img.set_qform(m, code=1)
        else:
            img.set_qform(None, code=0)
        img.set_sform(m, code=1)
        img.header.set_xyzt_units("mm")
    nib.save(img, os.fspath(path))
