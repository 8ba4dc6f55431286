"""Processes and sampling: the torchrun process group, the rank-split sampler that makes N
processes with batch B see the same global batches as one process with batch N*B, per-sample
generators that depend only on (seed, epoch, sample), and DDP's gradient-layout and bf16
all-reduce helpers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if launched by torchrun, else run single-process.

    NCCL on CUDA, gloo on CPU (the CPU path is what the 2-process tests use).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way, at a batch boundary.

    Each epoch uses ``randperm(n)`` seeded by ``seed + epoch``; the tail that does not fill a
    whole global batch is dropped, so every rank runs the same number of steps. Rank r takes
    ``perm[r::world]``, which makes global batch s of a world-N run equal to batch s of a
    one-process run with N-times the batch size.
    """

    def __init__(
        self, dataset: Dataset, world: int, rank: int, batch_size: int, seed: int, shuffle: bool
    ) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.start_batch = 0
        n = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = n // (world * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset has {n} samples, fewer than one global batch ({world} x {batch_size})"
            )

    def rank_indices(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        used = perm[: self.batches_per_epoch * self.num_replicas * self.batch_size]
        return used[self.rank :: self.num_replicas]

    def batches(self) -> Iterator[list[int]]:
        idx = self.rank_indices()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from b

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def sample_generator(seed: int, epoch: int, sample_id: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, sample, salt): resume- and rank-proof."""
    state = np.random.SeedSequence([seed, epoch, sample_id, salt]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) % (2**63))


def align_param_layout(module: nn.Module) -> list[str]:
    """Give each parameter the strides its gradient came out with (after one backward).

    DDP lays its gradient buckets out like the parameters; a kernel that returns a gradient
    with other strides (e.g. a 1x1x1 conv weight whose gradient has channels-last strides in
    its size-1 dimensions) makes DDP warn and copy every step. Where only size-1 dimensions
    differ the memory order is the same, so the parameter becomes a re-strided view of its own
    storage (no copy, values and optimiser state untouched). Returns the names changed.
    """
    changed = []
    for name, p in module.named_parameters():
        g = p.grad
        if g is None or g.stride() == p.stride() or g.shape != p.shape:
            continue
        if all(a == b for a, b, n in zip(g.stride(), p.stride(), p.shape) if n > 1):
            p.data = p.data.as_strided(p.shape, g.stride())
            changed.append(name)
    return changed


def bf16_allreduce_hook(state, bucket):  # noqa: ANN001, ANN201 - DDP rejects string annotations
    """DDP communication hook: average each gradient bucket in bf16 (half the bytes of fp32).

    Same as torch's ``bf16_compress_hook`` but backend-neutral (that one insists on NCCL), so
    the CPU/gloo tests run the very code the GPUs run.
    """
    buf = bucket.buffer()
    world = dist.get_world_size()
    comp = buf.to(torch.bfloat16).div_(world)
    fut = dist.all_reduce(comp, async_op=True).get_future()

    def back(f: torch.futures.Future) -> torch.Tensor:
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)
