"""A scalar 3D image in world (RAS) space, validated once at the edge.

The array is kept in Slicer/SimpleITK order ``[k, j, i]`` and the geometry as the 4x4 IJK->RAS
matrix Slicer's ``GetIJKToRASMatrix`` gives, so Slicer, SimpleITK and nibabel volumes all enter
the engine the same way and nothing downstream has to know where a volume came from.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import VolumeError
from .nifti import NIFTI_SUFFIXES, is_nifti, is_orthogonal, read_nifti, write_nifti

__all__ = ["Volume", "VolumeError", "LPS_TO_RAS", "MASK_SUFFIXES", "check_output", "fingerprint"]

# SimpleITK/ITK/DICOM are LPS; Slicer and the engine are RAS. The conversion happens only here.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_ijk(ijk_to_ras: Any, ras: Any) -> np.ndarray:
    """Continuous (i, j, k) indices of RAS points (..., 3) under a 4x4 IJK->RAS matrix.

    Free functions (and numpy only) so that callers holding just an array and a matrix, such as
    the Slicer module's UI thread, use the same rule as :class:`Volume`.
    """
    p = np.asarray(ras, dtype=np.float64)
    inv = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    return p @ inv[:3, :3].T + inv[:3, 3]


def index_inside(ijk: Any, shape_kji: Any) -> bool:
    """Whether continuous (i, j, k) indices lie in the voxels' footprint: [-0.5, n - 0.5)."""
    v = np.asarray(ijk, dtype=np.float64)
    size = np.asarray(tuple(shape_kji)[::-1], dtype=np.float64)
    return bool(np.all(v >= -0.5) and np.all(v < size - 0.5))


# Formats that hold a 3D volume with its full geometry (origin, spacing, direction); a .dcm mask
# is one multi-frame file. PNG, TIFF, VTK, JPEG ... lose the direction or a dimension.
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
MASK_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def _itk_reason(err: BaseException) -> str:
    """The useful part of a SimpleITK exception (no source location, object address or stale
    errno text)."""
    import re

    lines = [ln.strip() for ln in str(err).strip().splitlines()[1:] or [str(err)]]
    lines = [
        re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: )", "", ln)
        for ln in lines
        if ln and not ln.startswith("Reason: ")
    ]
    return " ".join(lines) or str(err).strip()


def check_output(path: str | os.PathLike, ijk_to_ras: Any = None) -> None:
    """VolumeError unless ``path``'s format keeps a 3D volume's geometry (``ijk_to_ras``'s, when
    given: a sheared matrix fits only NIfTI). Cheap: call it before any work."""
    name = Path(path).name.lower()
    if not name.endswith(MASK_SUFFIXES):
        raise VolumeError(
            f"cannot write a 3D mask to {Path(path).name!r}: use one of "
            f"{', '.join(MASK_SUFFIXES)} (formats such as .png, .tif, .vtk or "
            ".npy lose the geometry or a dimension)"
        )
    if ijk_to_ras is not None and not is_orthogonal(ijk_to_ras) and not is_nifti(path):
        raise VolumeError(
            f"the image's voxel axes are sheared (not perpendicular); only NIfTI "
            f"keeps such a geometry exactly, not {Path(path).name!r}: write the "
            "mask as .nii or .nii.gz"
        )


_MAX_SPACING_MM = 1e6


def _check_affine(ijk_to_ras: Any) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise VolumeError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise VolumeError("ijk_to_ras contains NaN or Inf")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeError(f"ijk_to_ras last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    a = m[:3, :3]
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(a, axis=0)
    if not np.all(np.isfinite(norms)) or np.any(norms > _MAX_SPACING_MM):
        raise VolumeError(
            f"ijk_to_ras gives voxels of {norms.tolist()} mm: not a plausible "
            "voxel size (over 1 km); check the image's spacing"
        )
    if np.any(norms <= 0):
        axes = [ax for ax, n in zip("ijk", norms) if n <= 0]
        raise VolumeError(f"ijk_to_ras is degenerate: zero spacing along axis {', '.join(axes)}")
    # Scale-free singularity test: the determinant of the direction part (columns normalised).
    det = float(np.linalg.det(a / norms))
    if abs(det) < 1e-6:
        raise VolumeError(
            f"ijk_to_ras is singular (normalised determinant {det:.2e}); "
            "the voxel axes do not span 3D space"
        )
    return m


def _check_array(array: Any) -> np.ndarray:
    a = np.asarray(array)
    if (
        a.dtype == object
        or a.dtype.kind in "mM"
        or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_)
    ):
        raise VolumeError(f"volume must hold real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise VolumeError("volume must hold real numbers, got complex values")
    if a.ndim == 4 and 1 in (a.shape[0], a.shape[-1]):
        raise VolumeError(
            f"volume has shape {a.shape}: a 4D array with a singleton axis; "
            "squeeze it to 3D [k, j, i] first"
        )
    if a.ndim != 3:
        kinds = {2: "a 2D image", 4: "4D (time series or vector) data"}
        kind = kinds.get(a.ndim, f"{a.ndim}D data")
        raise VolumeError(
            f"volume must be a 3D scalar array [k, j, i]; got {kind} with shape {a.shape}"
        )
    if min(a.shape) < 2:
        raise VolumeError(
            f"volume has shape {a.shape}: every axis needs at least 2 voxels "
            "(a single slice is a 2D image)"
        )
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise VolumeError(
                f"volume contains {bad} non-finite voxel(s) (NaN or Inf); "
                "replace them (e.g. with the background value) first"
            )
    return a


class Volume:
    """A validated scalar volume: ``array[k, j, i]`` plus its IJK->RAS matrix.

    Construction checks everything the engine relies on (3D scalar, finite values,
    non-degenerate geometry) so errors name the problem here instead of surfacing as a wrong
    mask later. The array is not copied when it is already a valid numpy array.
    """

    def __init__(self, array: Any, ijk_to_ras: Any) -> None:
        self.array: np.ndarray = _check_array(array)
        self.ijk_to_ras: np.ndarray = _check_affine(ijk_to_ras)
        # the source NIfTI header (qform/sform and codes), kept for masks written from it
        self.nifti_header: Any = None

    # --- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(K, J, I)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    def ras_to_ijk(self, ras: Any) -> np.ndarray:
        """Continuous (i, j, k) indices of RAS points (..., 3)."""
        return ras_to_ijk(self.ijk_to_ras, ras)

    def ijk_to_ras_points(self, ijk: Any) -> np.ndarray:
        """RAS positions of continuous (i, j, k) indices (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def contains(self, ras: Any) -> bool:
        """Whether a RAS point lies inside the volume's voxels (centre +/- half a voxel)."""
        return index_inside(self.ras_to_ijk(ras), self.shape)

    def like(self, array: Any) -> Volume:
        """A volume with the same geometry and another array (e.g. a mask)."""
        vol = Volume(array, self.ijk_to_ras)
        vol.nifti_header = self.nifti_header
        return vol

    @property
    def orthogonal(self) -> bool:
        """Whether the voxel axes are perpendicular (no shear): only NIfTI keeps a shear."""
        return is_orthogonal(self.ijk_to_ras)

    # --- SimpleITK ------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: Any) -> Volume:
        """From a SimpleITK image (LPS): converted to RAS here, once."""
        dim = image.GetDimension()
        comps = image.GetNumberOfComponentsPerPixel()
        if dim != 3:
            raise VolumeError(f"image is {dim}D ({image.GetSize()}); a 3D scalar image is needed")
        if comps != 1:
            raise VolumeError(
                f"image has {comps} components per voxel (vector/RGB); a scalar image is needed"
            )
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image)  # [k, j, i]
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction * spacing
        ijk_to_lps[:3, 3] = image.GetOrigin()
        return cls(array, LPS_TO_RAS @ ijk_to_lps)

    def to_sitk(self, array: Any = None) -> Any:
        """A SimpleITK image with this geometry (LPS), holding ``array`` or the volume's own."""
        import SimpleITK as sitk

        a = self.array if array is None else np.asarray(array)
        if a.shape != self.array.shape:
            raise VolumeError(f"array shape {a.shape} does not match the volume {self.shape}")
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(a))
        lps = LPS_TO_RAS @ self.ijk_to_ras
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
        image.SetOrigin(lps[:3, 3].tolist())
        return image

    # --- files ----------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike, series: str | None = None) -> Volume:
        """A NIfTI / NRRD / MHA / ... file, or a folder holding a DICOM series.

        NIfTI goes through nibabel (one geometry rule: the sform when set, else the qform; see
        :mod:`fastsam3d.nifti`), everything else through SimpleITK; DICOM series are validated
        first (:mod:`fastsam3d.dicom`; ``series`` picks one of several by UID or number).
        Truncated or corrupt files raise VolumeError instead of being read with zeros.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such image file or folder: {p}")
        if p.is_dir():
            from .dicom import read_series

            return cls.from_sitk(read_series(p, series))
        if series is not None:
            raise VolumeError(f"{p} is a file: a series can only be chosen in a DICOM folder")
        if is_nifti(p):
            array, affine, header = read_nifti(p)
            vol = cls(array, affine)
            vol.nifti_header = header
            return vol
        from .dicom import dicom_hint

        hint = dicom_hint(p)
        if p.name.upper() == "DICOMDIR":
            raise VolumeError(hint)
        try:
            import SimpleITK as sitk
        except ImportError:
            raise ImportError(f"reading {p.name} needs SimpleITK: pip install SimpleITK") from None
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as err:
            raise VolumeError(
                f"SimpleITK cannot read {p} (not an image, or truncated/corrupt): "
                f"{_itk_reason(err)}" + (f"\n{hint}" if hint else "")
            ) from None
        if hint and image.GetDimension() == 3 and image.GetSize()[2] == 1:
            raise VolumeError(f"{p} holds a single slice. {hint}")
        return cls.from_sitk(image)

    def write(self, path: str | os.PathLike, array: Any = None) -> None:
        """Write ``array`` (default: the volume's own) with exactly this geometry.

        The file is written beside ``path`` and renamed into place only after it reads back
        with the same voxels and geometry, so a full disk or a writer that drops part of the
        geometry leaves the previous file (if any) untouched and raises OSError. The format
        must hold a 3D geometry (:data:`MASK_SUFFIXES`, checked by :func:`check_output`).
        """
        check_output(path, self.ijk_to_ras)
        a = self.array if array is None else np.asarray(array)
        if a.shape != self.array.shape:
            raise VolumeError(f"array shape {a.shape} does not match the volume {self.shape}")
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        with atomic_path(path) as tmp:
            try:
                if is_nifti(tmp):
                    write_nifti(tmp, a, self.ijk_to_ras, self.nifti_header)
                else:
                    import SimpleITK as sitk

                    try:
                        sitk.WriteImage(self.to_sitk(a), str(tmp), useCompression=True)
                    except RuntimeError as err:
                        raise OSError(f"cannot write {path}: {_itk_reason(err)}") from None
            except OSError as err:
                if err.errno is None or err.filename is not None:
                    raise
                # nibabel's writes name no file ("[Errno 27] File too large"): name the output
                raise OSError(err.errno, err.strerror, os.fspath(path)) from err
            self._check_written(tmp, path, a)

    def _check_written(self, tmp: Path, path: str | os.PathLike, array: np.ndarray) -> None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = Volume.read(tmp)
        except (VolumeError, OSError) as err:
            raise OSError(
                f"writing {path} failed (the disk may be full): the file written "
                f"does not read back ({err})"
            ) from None
        if back.shape != self.shape or not np.array_equal(back.array, array):
            raise OSError(
                f"writing {path} failed (the disk may be full): the voxels written "
                "differ from the mask"
            )
        if not np.allclose(back.ijk_to_ras, self.ijk_to_ras, rtol=1e-6, atol=1e-3):
            raise OSError(
                f"writing {path} failed: the file's geometry differs from the image's "
                f"(written {np.round(back.ijk_to_ras, 4).tolist()}, expected "
                f"{np.round(self.ijk_to_ras, 4).tolist()})"
            )

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Volume(shape[k,j,i]={self.shape}, dtype={self.array.dtype}, spacing(i,j,k)=({sp}))"


_FULL_FINGERPRINT_BYTES = 1 << 20  # arrays up to this size are hashed whole on every prompt
_SAMPLE_VOXELS = 1 << 18  # larger ones: a fixed strided sample of about this many voxels


def fingerprint(a: np.ndarray) -> tuple:
    """Cheap identity of an array's contents: shape, dtype and a CRC of all of it (small arrays)
    or of a fixed strided sample (large ones; an edit between sampled voxels can go unseen).
    The session compares it on every prompt to notice a caller's in-place edit."""
    if a.nbytes > _FULL_FINGERPRINT_BYTES:
        step = max(1, math.ceil((a.size / _SAMPLE_VOXELS) ** (1 / 3)))
        a = a[::step, ::step, ::step]
    crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return a.shape, a.dtype.str, crc
