"""A scalar 3D image in world (RAS) space, validated once at the edge.

The array is kept in Slicer/SimpleITK order ``[k, j, i]`` and the geometry as the 4x4 IJK->RAS
matrix Slicer's ``GetIJKToRASMatrix`` gives, so Slicer, SimpleITK and nibabel volumes all enter
the engine the same way and nothing downstream has to know where a volume came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Volume", "VolumeError", "LPS_TO_RAS"]

# SimpleITK/ITK/DICOM are LPS; Slicer and the engine are RAS. The conversion happens only here.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_index(ijk_to_ras: Any, ras: Any) -> np.ndarray:
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


class VolumeError(ValueError):
    """The image cannot be segmented as given (shape, values or geometry)."""


def _check_affine(ijk_to_ras: Any) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise VolumeError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise VolumeError("ijk_to_ras contains NaN or Inf")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeError(f"ijk_to_ras last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    a = m[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    if np.any(norms <= 0):
        axes = [ax for ax, n in zip("ijk", norms) if n <= 0]
        raise VolumeError(f"ijk_to_ras is degenerate: zero spacing along axis {', '.join(axes)}")
    # Scale-free singularity test: the determinant of the direction part (columns normalised).
    det = float(np.linalg.det(a / norms))
    if abs(det) < 1e-6:
        raise VolumeError(f"ijk_to_ras is singular (normalised determinant {det:.2e}); "
                          "the voxel axes do not span 3D space")
    return m


def _check_array(array: Any) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise VolumeError(f"volume must hold real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise VolumeError("volume must hold real numbers, got complex values")
    if a.ndim == 4 and 1 in (a.shape[0], a.shape[-1]):
        raise VolumeError(f"volume has shape {a.shape}: a 4D array with a singleton axis; "
                          "squeeze it to 3D [k, j, i] first")
    if a.ndim != 3:
        kinds = {2: "a 2D image", 4: "4D (time series or vector) data"}
        kind = kinds.get(a.ndim, f"{a.ndim}D data")
        raise VolumeError(f"volume must be a 3D scalar array [k, j, i]; got {kind} "
                          f"with shape {a.shape}")
    if min(a.shape) < 2:
        raise VolumeError(f"volume has shape {a.shape}: every axis needs at least 2 voxels "
                          "(a single slice is a 2D image)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise VolumeError(f"volume contains {bad} non-finite voxel(s) (NaN or Inf); "
                              "replace them (e.g. with the background value) first")
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
        return ras_to_index(self.ijk_to_ras, ras)

    def ijk_to_ras_points(self, ijk: Any) -> np.ndarray:
        """RAS positions of continuous (i, j, k) indices (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def contains(self, ras: Any) -> bool:
        """Whether a RAS point lies inside the volume's voxels (centre +/- half a voxel)."""
        return index_inside(self.ras_to_ijk(ras), self.shape)

    def like(self, array: Any) -> Volume:
        """A volume with the same geometry and another array (e.g. a mask)."""
        return Volume(array, self.ijk_to_ras)

    # --- SimpleITK ------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: Any) -> Volume:
        """From a SimpleITK image (LPS): converted to RAS here, once."""
        dim = image.GetDimension()
        comps = image.GetNumberOfComponentsPerPixel()
        if dim != 3:
            raise VolumeError(f"image is {dim}D ({image.GetSize()}); a 3D scalar image is needed")
        if comps != 1:
            raise VolumeError(f"image has {comps} components per voxel (vector/RGB); "
                              "a scalar image is needed")
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
    def read(cls, path: str | os.PathLike) -> Volume:
        """NIfTI / NRRD / MHA / ... file, or a DICOM folder (through SimpleITK).

        Without SimpleITK, NIfTI files are read with nibabel.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such image file or folder: {p}")
        try:
            import SimpleITK as sitk
        except ImportError:
            sitk = None
        if sitk is None:
            if p.name.endswith((".nii", ".nii.gz")):
                return cls._read_nibabel(p)
            raise ImportError(f"reading {p.name} needs SimpleITK: pip install SimpleITK")
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(p))
            if not series:
                raise VolumeError(f"folder {p} holds no DICOM series")
            files = max((reader.GetGDCMSeriesFileNames(str(p), s) for s in series), key=len)
            if len(series) > 1:
                import warnings

                warnings.warn(f"{p} holds {len(series)} DICOM series; reading the largest "
                              f"({len(files)} files)", stacklevel=2)
            reader.SetFileNames(files)
            return cls.from_sitk(reader.Execute())
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as err:
            if p.name.endswith((".nii", ".nii.gz")):
                return cls._read_nibabel(p)
            raise VolumeError(f"SimpleITK cannot read {p}: {err}") from err
        return cls.from_sitk(image)

    @classmethod
    def _read_nibabel(cls, path: Path) -> Volume:
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise VolumeError(f"{path} holds {data.ndim}D data with shape {data.shape}; "
                              "a 3D scalar image is needed")
        return cls(np.ascontiguousarray(data.transpose(2, 1, 0)), img.affine)

    def write(self, path: str | os.PathLike, array: Any = None) -> None:
        """Write ``array`` (default: the volume's own) with this geometry (NIfTI, NRRD, ...)."""
        p = Path(path)
        try:
            import SimpleITK as sitk
        except ImportError:
            sitk = None
        if sitk is not None:
            sitk.WriteImage(self.to_sitk(array), str(p), useCompression=True)
            return
        if not p.name.endswith((".nii", ".nii.gz")):
            raise ImportError(f"writing {p.name} needs SimpleITK: pip install SimpleITK")
        import nibabel as nib

        a = self.array if array is None else np.asarray(array)
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(a.transpose(2, 1, 0)), self.ijk_to_ras),
                 str(p))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Volume(shape[k,j,i]={self.shape}, dtype={self.array.dtype}, spacing(i,j,k)=({sp}))"
