"""Training data: case discovery, per-class samples, crops built as inference builds them.

A *case* is an image + label-map pair on disk (NIfTI or anything MONAI's LoadImage reads). A
*sample* is one (case, class value) pair: SAM-Med3D and FastSAM3D train on binary targets,
one structure at a time. The crop is the 128³ patch at 1.5 mm on the lattice that
``fastsam3d.geometry`` defines for inference, centred on the structure, z-normalised over
``x > 0``; it is produced by one call into fastsam3d so that training and the Slicer session
can never drift apart.

MONAI is imported lazily: the GPU benchmark path (in-memory tensors) must run without it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .distributed import sample_generator

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    name: str
    image: str
    label: str


@dataclass(frozen=True)
class Sample:
    case: int  # index into the case list
    value: int  # label value that forms the binary target
    voxels: int  # its size, for filtering and reporting


def _stem(p: Path) -> str:
    name = p.name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def discover_nnunet(root: str | Path, split: str = "Tr") -> list[Case]:
    """nnU-Net raw layout: ``images{split}/<case>_0000.nii.gz`` + ``labels{split}/<case>.nii.gz``.

    Only channel 0000 is used (the networks take one channel); a missing label is an error,
    since silently dropping cases changes the dataset.
    """
    root = Path(root)
    img_dir, lab_dir = root / f"images{split}", root / f"labels{split}"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise FileNotFoundError(
            f"{root} is not an nnU-Net dataset: need {img_dir.name}/ and {lab_dir.name}/"
        )
    cases = []
    for img in sorted(img_dir.iterdir()):
        stem = _stem(img)
        if not stem.endswith("_0000"):
            continue
        name = stem[: -len("_0000")]
        suffix = img.name[len(stem) :]
        label = lab_dir / f"{name}{suffix}"
        if not label.exists():
            raise FileNotFoundError(f"case {name}: no label {label}")
        cases.append(Case(name=name, image=str(img), label=str(label)))
    if not cases:
        raise FileNotFoundError(f"no *_0000 images in {img_dir}")
    return cases


def read_list_file(path: str | Path) -> list[Case]:
    """A flat list: one ``image label`` pair per line (whitespace, tab or comma separated).

    Relative paths are relative to the list file; ``#`` starts a comment.
    """
    path = Path(path)
    cases = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'image label', got {line!r}")
        img, lab = (Path(p) if Path(p).is_absolute() else path.parent / p for p in parts)
        for p in (img, lab):
            if not p.exists():
                raise FileNotFoundError(f"{path}:{n}: {p} does not exist")
        cases.append(Case(name=_stem(img), image=str(img), label=str(lab)))
    if not cases:
        raise ValueError(f"{path} lists no cases")
    return cases


def discover(source: str | Path) -> list[Case]:
    """An nnU-Net dataset folder or a list file."""
    source = Path(source)
    if source.is_dir():
        return discover_nnunet(source)
    if source.is_file():
        return read_list_file(source)
    raise FileNotFoundError(f"{source}: neither a dataset folder nor a list file")


def load_array(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(array ``[k, j, i]``, ijk->RAS 4x4) through MONAI's LoadImage.

    MONAI returns ``[i, j, k]`` with a RAS affine; Slicer/fastsam3d use ``[k, j, i]``.
    """
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(str(path))
    arr = np.asarray(img)
    if arr.ndim == 4:  # a trailing channel: take the first
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {arr.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), affine


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape [k, j, i], ijk->RAS affine) from the file header alone where nibabel reads it
    (NIfTI: milliseconds), else through a full MONAI read."""
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape[:3])[::-1]
        return shape, np.asarray(img.affine, dtype=np.float64)
    arr, aff = load_array(path)
    return tuple(arr.shape), aff


def check_grids(cases: list[Case], atol: float = 1e-3) -> None:
    """Every case's label must lie on its image's grid (same shape and affine): checked from
    the headers before any work, so a misregistered case fails at once, by name."""
    for case in cases:
        (si, ai), (sl, al) = _header(case.image), _header(case.label)
        if si != sl:
            raise ValueError(
                f"case {case.name}: label shape {sl} differs from image shape "
                f"{si} ({case.label} vs {case.image})"
            )
        if not np.allclose(ai, al, atol=atol):
            worst = float(np.abs(ai - al).max())
            raise ValueError(
                f"case {case.name}: label affine differs from the image affine "
                f"(max difference {worst:.4g} mm; {case.label} vs {case.image})"
            )


def index_samples(
    cases: list[Case],
    classes: list[int] | None = None,
    min_voxels: int = 1,
    cache: str | Path | None = None,
) -> list[Sample]:
    """One sample per (case, label value present). Reads each label once; ``cache`` keeps the
    index in a JSON file keyed by the case list so large datasets are scanned only once."""
    # Keyed by the files' sizes and modification times too: an edited label re-indexes.
    key = case_stats(cases)
    if cache is not None and Path(cache).exists():
        stored = json.loads(Path(cache).read_text())
        if stored.get("cases") == key:
            samples = [Sample(**s) for s in stored["samples"]]
            return [
                s
                for s in samples
                if s.voxels >= min_voxels and (classes is None or s.value in classes)
            ]
    samples = []
    for ci, case in enumerate(cases):
        lab, _ = load_array(case.label)
        values, counts = np.unique(np.rint(lab).astype(np.int64), return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v != 0:
                samples.append(Sample(case=ci, value=int(v), voxels=int(c)))
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps({"cases": key, "samples": [asdict(s) for s in samples]}))
    return [
        s for s in samples if s.voxels >= min_voxels and (classes is None or s.value in classes)
    ]


def crop_sample(
    volume: torch.Tensor,
    affine: np.ndarray,
    label: np.ndarray,
    value: int,
    anchor: str = "centre",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image crop (1,128,128,128) z-normalised, binary target (1,128,128,128) float).

    ``volume`` is the (1, 1, K, J, I) float tensor of the image, ``label`` the ``[k, j, i]``
    label map. The crop is the reference's ``CropOrPad(mask)`` window: centred on the
    structure's bounding box on the 1.5 mm canonical lattice, with the start rounded exactly
    as the session rounds a click (``Lattice.crop_start``). Lattice, sampling and
    normalisation are fastsam3d.geometry's. The target is the structure's mask sampled the same
    way and thresholded at 0.5 (fastsam3d samples trilinearly; torchio uses nearest for labels,
    which differs only on boundary voxels). ``anchor`` picks the lattice variant
    (``Lattice.for_volume``); use the one the session will use (its ``lattice_anchor``).
    """
    from fastsam3d import geometry as geo

    mask = label == value
    if not mask.any():
        raise ValueError(f"label value {value} is absent")
    lattice = (
        geo.Lattice.for_volume(affine, label.shape)
        if anchor == "centre"
        else geo.Lattice.for_volume(affine, label.shape, anchor=anchor)
    )
    kji = np.argwhere(mask)
    corners = np.stack([kji.min(0), kji.max(0)])[:, ::-1].astype(np.float64)  # (i, j, k)
    box = np.array([[a, b, c] for a in corners[:, 0] for b in corners[:, 1] for c in corners[:, 2]])
    ras = box @ affine[:3, :3].T + affine[:3, 3]
    lat = lattice.ras_to_lattice(ras)
    centre_ras = lattice.lattice_to_ras((lat.min(0) + lat.max(0)) / 2)
    start = lattice.crop_start(centre_ras)
    image = geo.znormalize(geo.sample_crop(volume, lattice, affine, start))
    m = torch.from_numpy(mask.astype(np.float32)).to(volume.device)[None, None]
    target = (geo.sample_crop(m, lattice, affine, start) >= 0.5).float()
    return image[None].float().cpu(), target[None].cpu()


def znormalize(crop: torch.Tensor) -> torch.Tensor:
    """The reference's crop normalisation (mean/std over voxels > 0), from fastsam3d."""
    from fastsam3d import geometry

    return geometry.znormalize(crop)


def build_augment(flip_prob: float = 0.5, intensity_prob: float = 0.5) -> Any:
    """MONAI dictionary transforms: axis flips (image and label), intensity scale/shift jitter
    (``intensity_prob=0``: flips only, as the released training's ``RandomFlip``)."""
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    steps = [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=a) for a in range(3)]
    if intensity_prob > 0:
        steps += [
            RandScaleIntensityd(keys=["image"], factors=0.1, prob=intensity_prob),
            RandShiftIntensityd(keys=["image"], offsets=0.1, prob=intensity_prob),
        ]
    return Compose(steps)


def apply_augment(augment: Any, item: dict[str, Any], seed: int, epoch: int) -> dict[str, Any]:
    """Run a MONAI transform with randomness fixed by (seed, epoch, sample id): resume-exact."""
    g = sample_generator(seed, epoch, int(item["id"]), salt=1)
    augment.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    out = augment({"image": item["image"], "label": item["label"]})
    res = dict(item)
    res["image"] = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32).contiguous()
    res["label"] = torch.as_tensor(np.asarray(out["label"]), dtype=torch.float32).contiguous()
    return res


class CropDataset(Dataset):
    """Per-class 128³ crops from cases on disk, optionally augmented.

    ``get(i, epoch)`` is what the engine calls; augmentation depends only on (seed, epoch, i).
    A small LRU keeps recently read volumes (several classes of a case are usually adjacent
    in an index, and reading a CT costs more than cropping it).
    """

    def __init__(
        self,
        cases: list[Case],
        samples: list[Sample],
        augment: bool = False,
        seed: int = 2023,
        cache_volumes: int = 2,
        anchor: str = "centre",
        intensity: bool = True,
    ) -> None:
        if not samples:
            raise ValueError("no samples: every label is empty or filtered out")
        self.cases, self.samples = cases, samples
        self.augment = build_augment(intensity_prob=0.5 if intensity else 0.0) if augment else None
        self.seed = seed
        self._lru: OrderedDict[int, tuple[torch.Tensor, np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_volumes = cache_volumes
        self.anchor = anchor

    def __len__(self) -> int:
        return len(self.samples)

    def _volume(self, ci: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        if ci in self._lru:
            self._lru.move_to_end(ci)
            return self._lru[ci]
        case = self.cases[ci]
        img, aff = load_array(case.image)
        lab, lab_aff = load_array(case.label)
        if lab.shape != img.shape:
            raise ValueError(
                f"case {case.name}: label shape {lab.shape} differs from image shape {img.shape}"
            )
        if not np.allclose(lab_aff, aff, atol=1e-3):
            raise ValueError(
                f"case {case.name}: label affine differs from the image affine "
                f"(max difference {float(np.abs(lab_aff - aff).max()):.4g} mm)"
            )
        vol = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        rec = (vol, aff, np.rint(lab).astype(np.int64))
        self._lru[ci] = rec
        while len(self._lru) > self.cache_volumes:
            self._lru.popitem(last=False)
        return rec

    def get(self, i: int, epoch: int = 0) -> dict[str, Any]:
        s = self.samples[i]
        img, aff, lab = self._volume(s.case)
        image, label = crop_sample(img, aff, lab, s.value, self.anchor)
        item = {"image": image, "label": label, "id": i}
        if self.augment is not None:
            item = apply_augment(self.augment, item, self.seed, epoch)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i, 0)


def case_stats(cases: list[Case]) -> list[dict[str, Any]]:
    """Each case with its files' sizes and modification times: what decides whether prepared
    crops (or an index) still describe the files on disk."""
    return [
        {
            **asdict(c),
            "stat": [[os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in (c.image, c.label)],
        }
        for c in cases
    ]


class TensorCropDataset(Dataset):
    """Crops already in memory (synthetic data, tests, benchmarks).

    With ``device`` set the crops live there and ``get_batch`` indexes them directly, which
    is how the GPU benchmark measures the training step without host data loading.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        augment: bool = False,
        seed: int = 2023,
        device: str | torch.device | None = None,
        intensity: bool = True,
    ) -> None:
        if images.ndim != 5 or images.shape[1] != 1:
            raise ValueError(f"images must be (N,1,D,H,W), got {tuple(images.shape)}")
        self.images = images if device is None else images.to(device)
        self.labels = labels if labels is None or device is None else labels.to(device)
        self.augment = build_augment(intensity_prob=0.5 if intensity else 0.0) if augment else None
        self.seed = seed
        self.direct_batches = device is not None and not augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, i: int, epoch: int = 0) -> dict[str, Any]:
        item: dict[str, Any] = {"image": self.images[i], "id": i}
        if self.labels is not None:
            item["label"] = self.labels[i].float()
        if self.augment is not None:
            if self.labels is None:
                item["label"] = torch.zeros_like(item["image"])
            item = apply_augment(self.augment, item, self.seed, epoch)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i, 0)

    def get_batch(self, idx: list[int], epoch: int) -> dict[str, Any]:
        index = torch.as_tensor(idx)
        if self.images.device.type == "cuda":  # pinned: no host wait for the GPU
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        out: dict[str, Any] = {"image": self.images[index], "id": torch.as_tensor(idx)}
        if self.labels is not None:
            out["label"] = self.labels[index].float()
        return out
