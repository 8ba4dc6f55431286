"""Prepared crops: every case decoded once, each sample's crop and target stored as training
reads them (``prepare``), refused when stale; read back memory-mapped (DataLoader workers,
with augmentation) or by threads straight into pinned memory (:mod:`.prefetch`, without).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fastsam3d.geometry import CROP

from .data import Case, CropDataset, Sample, apply_augment, build_augment, case_stats
from .loading import worker_context

PREPARED_FORMAT = "fastsam3d-distill-prepared/1"


def prepared_manifest(
    cases: list[Case],
    samples: list[Sample],
    anchor: str,
    classes: list[int] | None,
    min_voxels: int,
) -> dict[str, Any]:
    """Everything that decides prepared crops: the source files (sizes, mtimes), the samples,
    the lattice anchor and the filters. Prepared data is used only if all agree."""
    return {
        "format": PREPARED_FORMAT,
        "cases": case_stats(cases),
        "samples": [asdict(s) for s in samples],
        "lattice_anchor": anchor,
        "classes": classes,
        "min_voxels": min_voxels,
        "crop": [1, CROP, CROP, CROP],
    }


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def prepare_crops(
    cases: list[Case],
    samples: list[Sample],
    out: str | Path,
    anchor: str = "centre",
    classes: list[int] | None = None,
    min_voxels: int = 1,
    workers: int = 0,
) -> Path:
    """Decode every case once and store each sample's crop and target as it will be trained
    on: ``images.npy`` (N,1,128,128,128 float32, z-normalised) and ``targets.npy`` (uint8),
    uncompressed so that workers memory-map them and only slice, flip and jitter.

    The crops come from :class:`CropDataset` (``crop_sample``, i.e. fastsam3d's lattice and
    sampling), so they are exactly the NIfTI path's. ``manifest.json`` records what made them;
    a folder of other settings is refused, the same settings complete are reused as they are,
    and an interrupted run is redone.
    """
    from torch.utils.data import DataLoader

    from fastsam3d.atomic import atomic_path

    out = Path(out)
    man_path = out / "manifest.json"
    manifest = prepared_manifest(cases, samples, anchor, classes, min_voxels)
    if man_path.exists():
        old = json.loads(man_path.read_text())
        complete = old.pop("complete", False)
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(
                f"{out} holds data prepared with other settings or from other "
                f"files ({', '.join(diff)} differ); use a new --out"
            )
        if complete:
            return out
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no prepared data; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(man_path) as tmp:
        Path(tmp).write_text(json.dumps({**manifest, "complete": False}))
    n, c = len(samples), CROP
    images = np.lib.format.open_memmap(
        out / "images.npy", mode="w+", dtype=np.float32, shape=(n, 1, c, c, c)
    )
    targets = np.lib.format.open_memmap(
        out / "targets.npy", mode="w+", dtype=np.uint8, shape=(n, 1, c, c, c)
    )
    ds = CropDataset(cases, samples, anchor=anchor, cache_volumes=1)
    # one batch per case: each worker decodes a case once and crops all its samples
    by_case: OrderedDict[int, list[int]] = OrderedDict()
    for i, s in enumerate(samples):
        by_case.setdefault(s.case, []).append(i)
    loader = DataLoader(
        ds,
        batch_sampler=list(by_case.values()),
        num_workers=workers,
        collate_fn=_as_list,
        multiprocessing_context=worker_context() if workers else None,
    )
    for items in loader:
        for it in items:
            images[it["id"]] = it["image"].numpy()
            targets[it["id"]] = it["label"].numpy().astype(np.uint8)
    images.flush()
    targets.flush()
    del images, targets
    with atomic_path(man_path) as tmp:
        Path(tmp).write_text(json.dumps({**manifest, "complete": True}))
    return out


class PreparedCropDataset(Dataset):
    """Crops written by :func:`prepare_crops`, memory-mapped: a worker reads one sample's
    10 MB and augments it, with the same seeded augmentation as :class:`CropDataset`, so
    items are identical to the NIfTI path's.

    ``labels=False`` (stage 1) leaves the target out of the items. Opening checks the
    manifest against the source files (sizes, modification times) and against ``expect``
    (lattice anchor, classes, min voxels): stale or mismatched data is refused, naming what
    differs.
    """

    def __init__(
        self,
        folder: str | Path,
        augment: bool = False,
        seed: int = 2023,
        intensity: bool = True,
        expect: dict[str, Any] | None = None,
        labels: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.labels = labels
        man_path = self.folder / "manifest.json"
        if not man_path.is_file():
            raise FileNotFoundError(
                f"{folder}: no prepared data (manifest.json); run `fastsam3d-distill prepare` first"
            )
        man = json.loads(man_path.read_text())
        if man.get("format") != PREPARED_FORMAT:
            raise ValueError(
                f"{folder}: prepared data of format {man.get('format')!r}, this "
                f"version reads {PREPARED_FORMAT!r}; prepare again"
            )
        if not man.get("complete"):
            raise ValueError(f"{folder}: preparation did not finish; run `prepare` again")
        self.cases = [
            Case(name=c["name"], image=c["image"], label=c["label"]) for c in man["cases"]
        ]
        for rec, case in zip(man["cases"], self.cases):
            for f, st in zip((case.image, case.label), rec["stat"]):
                if not os.path.exists(f):
                    raise FileNotFoundError(f"{folder} is stale: case {case.name}'s {f} is gone")
                now = [os.stat(f).st_size, os.stat(f).st_mtime_ns]
                if now != st:
                    raise ValueError(
                        f"{folder} is stale: case {case.name}'s {f} changed since "
                        "it was prepared (size or modification time); prepare "
                        "again into a new folder"
                    )
        for key, want in (expect or {}).items():
            if man.get(key) != want:
                raise ValueError(
                    f"{folder} was prepared with {key}={man.get(key)!r}, this run "
                    f"asks for {want!r}; prepare again or match it"
                )
        self.samples = [Sample(**s) for s in man["samples"]]
        self.lattice_anchor = man["lattice_anchor"]
        self.augment = build_augment(intensity_prob=0.5 if intensity else 0.0) if augment else None
        self.seed = seed
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._files: dict[str, tuple[int, int, int]] | None = None

    @property
    def direct_read(self) -> bool:
        """Without augmentation a sample is its stored bytes: the trainer reads batches in
        threads straight into pinned memory (:mod:`.prefetch`), no worker processes."""
        return self.augment is None

    def sample_fields(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, torch.dtype]]:
        """Per-sample fields for :class:`~.prefetch.BatchPrefetcher`: (shape, host dtype,
        device dtype); the target crosses as uint8 and is widened on the device."""
        shape = (1, CROP, CROP, CROP)
        fields = {"image": (shape, torch.float32, torch.float32)}
        if self.labels:
            fields["label"] = (shape, torch.uint8, torch.float32)
        return fields

    def read_into(self, i: int, dest: dict[str, np.ndarray]) -> None:
        """Read sample ``i``'s stored bytes into ``dest``'s arrays (one ``preadv`` each:
        no page faults on a memory map, no intermediate copy, the GIL released)."""
        if self._files is None:
            files = {}
            for name, fname in (("image", "images.npy"), ("label", "targets.npy")):
                arr = np.load(self.folder / fname, mmap_mode="r")
                fd = os.open(self.folder / fname, os.O_RDONLY)
                files[name] = (fd, int(arr.offset), int(arr[0].nbytes))
                del arr
            self._files = files
        for name, arr in dest.items():
            fd, offset, size = self._files[name]
            got = os.preadv(fd, [memoryview(arr).cast("B")], offset + i * size)
            if got != size:
                raise OSError(f"{self.folder}: short read of sample {i} ({got} of {size} bytes)")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # workers map the files themselves (a memmap pickles its data)
        state["_files"] = None  # descriptors are per process
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (
                np.load(self.folder / "images.npy", mmap_mode="r"),
                np.load(self.folder / "targets.npy", mmap_mode="r"),
            )
        return self._arrays

    def get(self, i: int, epoch: int = 0) -> dict[str, Any]:
        images, targets = self._maps()
        item: dict[str, Any] = {"image": torch.from_numpy(np.array(images[i])), "id": i}
        if self.labels or self.augment is not None:  # flips must see the label too
            item["label"] = torch.from_numpy(targets[i].astype(np.float32))
        if self.augment is not None:
            item = apply_augment(self.augment, item, self.seed, epoch)
            if not self.labels:
                del item["label"]
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i, 0)
