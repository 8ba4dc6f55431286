"""Synthetic CT/MR-like phantoms for tests and demos.

Real data cannot ship with the repository, yet every stage (crop, distil, fine-tune, evaluate)
needs volumes with structures, texture, noise, an intensity bias and a non-trivial affine. The
phantom gives that in a few milliseconds, deterministically from a seed.

Arrays are in Slicer/SimpleITK order ``[k, j, i]``; the affine maps ``(i, j, k, 1)`` to RAS mm,
the convention of ``fastsam3d.Volume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage


@dataclass
class Phantom:
    """One synthetic case: image ``[k,j,i]`` float32, label ``[k,j,i]`` int16, ijk->RAS 4x4."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_phantom(
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    n_ellipsoids: int = 2,
    n_tubes: int = 1,
    seed: int = 0,
    oblique_deg: float = 0.0,
    noise: float = 0.05,
    bias: float = 0.3,
) -> Phantom:
    """Ellipsoids and curved tubes inside a body, with texture, noise and a bias field.

    ``shape`` is ``(nk, nj, ni)``; ``spacing`` is ``(si, sj, sk)`` in mm. Labels are 1..n in
    drawing order (later structures overwrite earlier ones). Outside the body the image is 0,
    so the reference's z-normalisation over ``x > 0`` has a real background to ignore.
    """
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    k, j, i = np.meshgrid(
        np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij"
    )
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.int16)

    body = (i / 0.95) ** 2 + (j / 0.9) ** 2 + (k / 0.97) ** 2 <= 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0).astype(np.float32)
    texture /= max(float(texture.std()), 1e-6)
    image[body] = 1.0 + 0.05 * texture[body]

    value = 1
    for _ in range(n_ellipsoids):
        c = rng.uniform(-0.4, 0.4, size=3)
        r = rng.uniform(0.15, 0.3, size=3)
        rot = _rotation(rng, 45.0)
        p = np.stack([i - c[0], j - c[1], k - c[2]], axis=-1) @ rot
        inside = ((p / r) ** 2).sum(-1) <= 1.0
        level = rng.uniform(1.5, 3.0) * rng.choice([-1.0, 1.0]) * 0.4 + 1.0
        tex = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0).astype(np.float32)
        image[inside] = level + 0.1 * tex[inside]
        label[inside] = value
        value += 1

    for _ in range(n_tubes):
        # A helix-like centre line; the tube is every voxel within radius of it.
        t = np.linspace(0, 1, 200)
        a0, a1 = rng.uniform(-0.5, 0.5, size=2), rng.uniform(0.2, 0.5)
        phase = rng.uniform(0, 2 * np.pi)
        line = np.stack(
            [
                a0[0] + a1 * np.cos(2 * np.pi * t + phase),
                a0[1] + a1 * np.sin(2 * np.pi * t + phase),
                -0.7 + 1.4 * t,
            ],
            axis=-1,
        )
        grid_idx = np.round((line + 1) / 2 * (np.array([ni, nj, nk]) - 1)).astype(int)
        seed_mask = np.zeros(shape, bool)
        seed_mask[grid_idx[:, 2], grid_idx[:, 1], grid_idx[:, 0]] = True
        dist = ndimage.distance_transform_edt(~seed_mask)
        inside = (dist <= rng.uniform(2.0, 3.5)) & body
        image[inside] = 2.2 + 0.05 * texture[inside]
        label[inside] = value
        value += 1

    # Smooth multiplicative bias field (MR-like inhomogeneity), then additive noise.
    coeffs = rng.uniform(-bias, bias, size=4)
    field = np.exp(coeffs[0] * i + coeffs[1] * j + coeffs[2] * k + coeffs[3] * i * j)
    image = image * field.astype(np.float32)
    image = image + noise * rng.standard_normal(shape).astype(np.float32) * body
    image = np.where(body, np.maximum(image, 1e-3), 0.0).astype(np.float32)

    affine = np.eye(4)
    rot = _rotation(rng, oblique_deg) if oblique_deg > 0 else np.eye(3)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-50, 50, size=3)
    return Phantom(image=image, label=label, affine=affine)


def write_nifti(phantom: Phantom, image_path: str | Path, label_path: str | Path) -> None:
    """Write image and label as NIfTI (nibabel stores arrays in ``[i, j, k]`` order)."""
    import nibabel as nib

    for arr, path in ((phantom.image, image_path), (phantom.label, label_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), phantom.affine)
        img.set_qform(phantom.affine, code=1)
        img.set_sform(phantom.affine, code=1)
        nib.save(img, str(path))


def write_nnunet_dataset(
    root: str | Path, n_cases: int = 4, seed: int = 0, **phantom_kw: object
) -> Path:
    """Write ``n_cases`` phantoms in nnU-Net raw layout (``imagesTr/X_0000.nii.gz``, labelsTr)."""
    root = Path(root)
    for c in range(n_cases):
        ph = make_phantom(seed=seed + c, **phantom_kw)  # type: ignore[arg-type]
        name = f"case_{c:03d}"
        write_nifti(
            ph, root / "imagesTr" / f"{name}_0000.nii.gz", root / "labelsTr" / f"{name}.nii.gz"
        )
    return root


def synthetic_crops(
    n: int, seed: int = 0, size: int = 128, structure: int | None = None, gen_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` phantoms generated directly at the model's crop size: (images, binary labels),
    each (n, 1, size, size, size) float32, images z-normalised over ``x > 0``.

    For tests and benchmarks that exercise training without disk IO or resampling; the label
    is structure ``structure`` (default: a random one per case) of each phantom. Phantoms are
    drawn at ``gen_size`` and upsampled (trilinear image, nearest label), which keeps tests fast.
    """
    import torch.nn.functional as F

    from .data import znormalize

    rng = np.random.default_rng(seed)
    images = torch.empty(n, 1, size, size, size)
    labels = torch.empty(n, 1, size, size, size)
    for c in range(n):
        ph = make_phantom(shape=(gen_size,) * 3, seed=seed * 1000 + c)
        values = [v for v in np.unique(ph.label) if v != 0]
        v = structure if structure is not None else int(rng.choice(values))
        img = torch.from_numpy(ph.image)[None, None]
        lab = torch.from_numpy((ph.label == v).astype(np.float32))[None, None]
        if gen_size != size:
            img = F.interpolate(img, size=(size,) * 3, mode="trilinear", align_corners=False)
            lab = F.interpolate(lab, size=(size,) * 3, mode="nearest")
        images[c, 0] = znormalize(img[0, 0])
        labels[c, 0] = lab[0, 0]
    return images, labels
