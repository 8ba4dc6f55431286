"""How batches reach the trainer: collation into shared memory in DataLoader workers, items
keyed by (sample, epoch) so one persistent DataLoader serves every epoch, the worker start
method, and the host-to-device copy through pinned memory. (Prepared crops without
augmentation bypass the DataLoader: :mod:`.prefetch`.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .distributed import ResumableDistributedSampler


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; in a DataLoader worker straight into shared memory (as PyTorch's
    default collate does), which saves one copy of every batch on its way to the trainer."""
    out: dict[str, Any] = {}
    in_worker = torch.utils.data.get_worker_info() is not None
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            dest = None
            if in_worker and vals[0].device.type == "cpu":
                shape = (len(vals), *vals[0].shape)
                storage = vals[0]._typed_storage()._new_shared(math.prod(shape), device="cpu")
                dest = vals[0].new(storage).resize_(shape)
            out[key] = torch.stack(vals, out=dest)
        elif isinstance(vals[0], (int, float, np.integer, np.floating)):
            out[key] = torch.as_tensor(vals)
        else:
            out[key] = vals
    return out


class EpochDataset(Dataset):
    """Items keyed by (sample, epoch): datasets whose items depend on the epoch (seeded
    augmentation) get it with the index, so one persistent DataLoader serves every epoch."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        i, epoch = key
        getter = getattr(self.base, "get", None)
        return getter(i, epoch) if getter is not None else self.base[i]


class EpochBatches:
    """Batch sampler reading the trainer's epoch and resume position at every ``iter()``."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in self.sampler.batches():
            yield [(i, self.epoch) for i in b]

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.sampler.start_batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Host tensors go through pinned memory: a copy from pageable memory would make the
    host wait for the GPU (the stream is synchronised first), once per step."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "id":  # a host list: reading ids must never wait for the GPU (and DDP
            out[k] = v.tolist() if isinstance(v, torch.Tensor) else list(v)  # moves tensors)
        elif isinstance(v, torch.Tensor) and device.type == "cuda" and v.device.type == "cpu":
            out[k] = (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
        else:
            out[k] = v.to(device) if isinstance(v, torch.Tensor) else v
    return out


def worker_context() -> str | None:
    """DataLoader worker start method: forked workers of a process that has initialised CUDA
    (and NCCL) die with 'CUDA error: initialization error' (seen on 2 H200s); forkserver
    starts them clean. Plain fork otherwise (fast, and what the CPU tests use)."""
    return "forkserver" if torch.cuda.is_available() and torch.cuda.is_initialized() else None
