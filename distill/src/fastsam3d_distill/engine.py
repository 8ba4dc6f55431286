"""The training engine shared by both stages: torchrun/DDP, accumulation, gating, exact resume.

A stage supplies a :class:`Task` (the trainable module whose ``forward(batch)`` returns one
loss per sample, plus an optional ``prepare`` run outside DDP, e.g. the frozen teacher) and a
dataset; the engine owns everything that must be identical across stages so that resume and
multi-process runs are exact:

* sampling: an epoch-seeded permutation split across ranks so that N processes with batch B
  see the same global batches as one process with batch N*B (the 1-vs-N equivalence test
  relies on this); the position inside the epoch is part of the checkpoint;
* per-sample randomness (augmentation, simulated clicks) comes from generators seeded by
  (seed, epoch, sample id), never from global state, so it survives resume and workers;
* checkpoints are written to a temporary file and renamed, so a kill mid-write leaves the
  previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fastsam3d.atomic import atomic_path

from .gating import BackwardGate

CKPT_FORMAT = "fastsam3d-distill-train/1"
# Test hook: SIGKILL this process when this optimiser step begins (a real, unclean death).
_KILL_ENV = "FASTSAM3D_DISTILL_KILL_AT_STEP"


# ----------------------------------------------------------------------------- distributed


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


def _all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- sampling


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


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, np.integer, np.floating)):
            out[key] = torch.as_tensor(vals)
        else:
            out[key] = vals
    return out


class _EpochDataset(Dataset):
    """Hands the epoch to datasets whose items depend on it (seeded augmentation)."""

    def __init__(self, base: Dataset, epoch: int) -> None:
        self.base, self.epoch = base, epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        getter = getattr(self.base, "get", None)
        return getter(i, self.epoch) if getter is not None else self.base[i]


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save that never leaves a half-written checkpoint (fastsam3d's atomic write)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint this engine wrote (weights-only unpickling: no code runs)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(
            f"{path} is not a fastsam3d-distill training checkpoint (use `fastsam3d-distill "
            "export` output with fastsam3d.load_model instead)"
        )
    return ckpt


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state_to_plain(random.getstate()),
    }


def _py_state_to_plain(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ----------------------------------------------------------------------------- config + task


@dataclass
class TrainConfig:
    out_dir: str = "runs/distill"
    epochs: int = 1
    max_steps: int = 0  # optimiser steps; 0 = run all epochs
    batch_size: int = 1  # per process
    accum: int = 1  # real backward passes per optimiser step
    lr: float = 8e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear LR warm-up, then constant (the released code's LR is flat)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (the released code: off)
    precision: str = "auto"  # "bf16" | "fp32" | "auto" (bf16 on CUDA, fp32 on CPU)
    seed: int = 2023
    shuffle: bool = True
    ckpt_every: int = 100  # optimiser steps
    log_every: int = 10  # micro-batches
    num_workers: int = 0
    device: str = "auto"
    resume: bool = True
    gate: bool = False
    gate_warmup: int = 500
    gate_threshold: float = 0.0
    gate_decay: float = 0.95
    gate_min_backward: float | str = "auto"
    tensorboard: bool = True
    progress: bool = True
    timing: bool = False  # synchronise around phases to time them (costs some overlap)
    max_micro_steps: int = 0  # stop after this many micro-batches (0 = no limit)
    max_seconds: float = 0.0  # stop after this much wall time (benchmarks; 0 = no limit)
    checkpoints: bool = True  # False: write no checkpoints at all (throughput benchmarks)


class Task(nn.Module):
    """A stage's trainable part. ``forward(batch)`` returns per-sample losses, shape (B,)."""

    name = "task"
    find_unused = True  # DDP: some parameters may get no gradient in a step

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Work outside DDP and outside autograd (frozen teacher, cached-target loading)."""
        return batch

    def set_progress(self, epoch: int, step: int) -> None:
        """Called before each micro-batch (progressive schedules)."""

    def scalars(self) -> dict[str, float]:
        return {}

    def meta(self) -> dict[str, Any]:
        """JSON-able facts needed to rebuild the model from a checkpoint (configs)."""
        return {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen_")}


# ----------------------------------------------------------------------------- trainer


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class Trainer:
    """Runs a Task over a dataset; see the module docstring for the guarantees."""

    def __init__(self, task: Task, dataset: Dataset, cfg: TrainConfig, env: DistEnv | None = None):
        self.cfg = cfg
        self.env = env or init_distributed(cfg.device)
        self.task = task.to(self.env.device)
        self.dataset = dataset
        self.out = Path(cfg.out_dir)
        prec = cfg.precision
        if prec == "auto":
            prec = "bf16" if self.env.device.type == "cuda" else "fp32"
        if prec not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16, fp32 or auto, got {cfg.precision!r}")
        self.precision = prec
        params = [p for p in self.task.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"task {task.name!r} has no trainable parameters")
        fused = self.env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused
        )
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        self.gate = BackwardGate(
            warmup=cfg.gate_warmup,
            threshold=cfg.gate_threshold,
            decay=cfg.gate_decay,
            min_backward=cfg.gate_min_backward,
            enabled=cfg.gate,
        )
        self.sampler = ResumableDistributedSampler(
            dataset, self.env.world, self.env.rank, cfg.batch_size, cfg.seed, cfg.shuffle
        )
        if self.env.distributed:
            dev_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.ddp: nn.Module = nn.parallel.DistributedDataParallel(
                self.task, device_ids=dev_ids, find_unused_parameters=task.find_unused
            )
        else:
            self.ddp = self.task
        self.epoch = 0
        self.batch_in_epoch = 0
        self.opt_step = 0
        self.micro_step = 0
        self.window_backward = 0
        self.window_unsynced = False
        self.history: list[dict[str, float]] = []
        self.timing = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        self._writer = None
        self._jsonl = None
        self._t_start = time.perf_counter()
        self._out_of_time = False
        self.grad_norm: torch.Tensor | None = None

    # -- checkpointing ---------------------------------------------------------------------

    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    def state(self) -> dict[str, Any]:
        rngs = _all_gather_objects(self.env, _rng_state())
        return {
            "format": CKPT_FORMAT,
            "task": self.task.name,
            "model": self.task.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "opt_step": self.opt_step,
                "micro_step": self.micro_step,
                "world": self.env.world,
                "global_batch": self.cfg.batch_size * self.env.world,
            },
            "gate": self.gate.state_dict(),
            "rng": rngs,
            "config": json.dumps(asdict(self.cfg)),
            "meta": json.dumps(self.task.meta()),
        }

    def save(self, path: Path | None = None) -> None:
        state = self.state()  # collective: every rank takes part
        if self.env.is_main:
            atomic_save(state, path or self.ckpt_path)
        if self.env.distributed:
            dist.barrier()

    def load(self, path: Path) -> None:
        ckpt = load_training_checkpoint(path)
        if ckpt["task"] != self.task.name:
            raise ValueError(
                f"{path} was written by stage {ckpt['task']!r}, not {self.task.name!r}"
            )
        missing, unexpected = self.task.load_state_dict(ckpt["model"], strict=False)
        trainable = set(self.task.trainable_state_dict())
        if unexpected or (set(missing) & trainable):
            raise ValueError(f"checkpoint does not match the model: missing {missing}, "
                             f"unexpected {unexpected}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        p = ckpt["progress"]
        global_batch = self.cfg.batch_size * self.env.world
        if p["global_batch"] != global_batch:
            raise ValueError(
                f"{path}: the run used a global batch of {p['global_batch']} (batch size x "
                f"processes), this one {global_batch}; resume with the same global batch "
                "(e.g. 2 processes x 4 = 1 process x 8) or start a new --out"
            )
        self.epoch, self.batch_in_epoch = p["epoch"], p["batch_in_epoch"]
        self.opt_step, self.micro_step = p["opt_step"], p["micro_step"]
        self.gate.load_state_dict(ckpt["gate"])
        rngs = ckpt["rng"]
        if p["world"] == self.env.world:
            _set_rng_state(rngs[self.env.rank])
        elif self.env.is_main:
            print(f"[distill] resuming a {p['world']}-process run on {self.env.world}: the "
                  "global RNG streams restart (sampling, augmentation and clicks are seeded "
                  "per sample and stay exact)")

    # -- logging ---------------------------------------------------------------------------

    def _log(self, scalars: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        self._sync()  # so that "time" marks finished GPU work
        rec = {"step": self.opt_step, "micro_step": self.micro_step,
               "time": time.perf_counter() - self._t_start, **scalars}
        self.history.append(rec)
        if self._jsonl is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self.cfg.tensorboard:
            if self._writer is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is optional (e.g. on a bare GPU box)
                    self.cfg.tensorboard = False
                    return
                self._writer = SummaryWriter(str(self.out / "tb"))
            for k, v in scalars.items():
                self._writer.add_scalar(k, v, self.micro_step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()

    # -- the loop --------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start_batch = self.batch_in_epoch
        if getattr(self.dataset, "direct_batches", False):  # device-resident (benchmarks)
            for idx in self.sampler.batches():
                yield self.dataset.get_batch(idx, self.epoch)  # type: ignore[attr-defined]
            return
        loader = DataLoader(
            _EpochDataset(self.dataset, self.epoch),
            batch_sampler=list(self.sampler.batches()),
            num_workers=self.cfg.num_workers,
            collate_fn=collate,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=False,
        )
        yield from loader

    def _gather(
        self, ids: torch.Tensor, losses: torch.Tensor
    ) -> tuple[list[int], list[float]]:
        """Every rank's (sample id, loss) pairs, in rank order; one small collective."""
        local = torch.stack([ids.to(losses.device).double(), losses.double().reshape(-1)])
        if self.env.distributed:
            parts = [torch.empty_like(local) for _ in range(self.env.world)]
            dist.all_gather(parts, local)
            local = torch.cat(parts, dim=1)
        arr = local.cpu()
        return [int(i) for i in arr[0].tolist()], arr[1].tolist()

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def _step_optimizer(self) -> None:
        if self.env.distributed and self.window_unsynced:
            # The last backward of this window ran under no_sync (the window was cut short by
            # the end of training): average the local gradients by hand.
            for prm in self.task.parameters():
                if prm.grad is not None:
                    dist.all_reduce(prm.grad)
                    prm.grad /= self.env.world
        if self.window_backward < self.cfg.accum:
            scale = self.cfg.accum / self.window_backward
            for prm in self.task.parameters():
                if prm.grad is not None:
                    prm.grad *= scale
        if self.cfg.grad_clip > 0:
            params = [p for p in self.task.parameters() if p.grad is not None]
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.opt_step += 1
        self.window_backward = 0
        self.window_unsynced = False

    def _done(self) -> bool:
        cfg = self.cfg
        return (
            (bool(cfg.max_steps) and self.opt_step >= cfg.max_steps)
            or (bool(cfg.max_micro_steps) and self.micro_step >= cfg.max_micro_steps)
            or self._out_of_time
        )

    def _check_time(self) -> None:
        """Wall-time limit, decided on rank 0 and shared, so that every rank stops together."""
        if not self.cfg.max_seconds:
            return
        over = torch.tensor(
            [float(time.perf_counter() - self._t_start > self.cfg.max_seconds)],
            device=self.env.device if self.env.device.type == "cuda" else "cpu",
        )
        if self.env.distributed:
            dist.broadcast(over, 0)
        self._out_of_time = bool(over.item())

    def fit(self) -> dict[str, Any]:
        """Train to the configured length, resuming from ``out_dir/last.pt`` when present."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.env.rank)
        if cfg.resume and self.ckpt_path.exists():
            self.load(self.ckpt_path)
            if self.env.is_main:
                print(f"[distill] resumed from {self.ckpt_path} at step {self.opt_step}")
        kill_at = int(os.environ.get(_KILL_ENV, "0") or 0)
        total = cfg.max_steps or math.ceil(
            cfg.epochs * self.sampler.batches_per_epoch / cfg.accum
        )
        bar = None
        if cfg.progress and self.env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.opt_step, desc=self.task.name, unit="step")
        autocast = torch.autocast(
            self.env.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        t_start = self._t_start = time.perf_counter()
        samples_seen = 0
        timing = cfg.timing
        while self.epoch < cfg.epochs and not self._done():
            for batch in self._batches():
                if kill_at and self.opt_step + 1 == kill_at and self.window_backward == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.task.set_progress(self.epoch, self.opt_step)
                batch = _to_device(batch, self.env.device)
                t0 = time.perf_counter()
                with torch.no_grad(), autocast:
                    batch = self.task.prepare(batch)
                want_log = (self.micro_step + 1) % cfg.log_every == 0
                last_in_window = self.window_backward + 1 >= cfg.accum
                no_sync = self.env.distributed and not last_in_window
                ctx = self.ddp.no_sync() if no_sync else contextlib.nullcontext()  # type: ignore[operator]
                with ctx:
                    with autocast:
                        losses = self.ddp(batch)
                    all_ids: list[int] = []
                    all_losses: list[float] = []
                    if cfg.gate or want_log:
                        all_ids, all_losses = self._gather(batch["id"], losses.detach())
                    if timing:
                        self._sync()
                    t1 = time.perf_counter()
                    self.timing["forward_s"] += t1 - t0
                    run_backward = self.gate.decide(all_ids, all_losses) if cfg.gate else True
                    if self.gate.note and self.env.is_main:
                        print(f"[distill] warning: {self.gate.note}")
                        self.gate.note = ""
                    if run_backward:
                        (losses.float().mean() / cfg.accum).backward()
                        self.window_backward += 1
                        self.window_unsynced = no_sync
                    del losses
                    if timing:
                        self._sync()
                    t2 = time.perf_counter()
                    self.timing["backward_s"] += t2 - t1
                self.batch_in_epoch += 1
                self.micro_step += 1
                samples_seen += cfg.batch_size * self.env.world
                if self.window_backward >= cfg.accum:
                    self._step_optimizer()
                    if timing:
                        self._sync()
                    self.timing["optimizer_s"] += time.perf_counter() - t2
                    if bar is not None:
                        bar.update(1)
                if want_log:
                    if bar is not None:
                        bar.set_postfix(loss=f"{np.mean(all_losses):.4g}")
                    self._log({
                        "loss": float(np.mean(all_losses)),
                        "lr": self.scheduler.get_last_lr()[0],
                        "epoch": self.epoch,
                        **self.gate.stats(),
                        **self.task.scalars(),
                        **({"grad_norm": float(self.grad_norm)}
                           if self.grad_norm is not None else {}),
                    })
                if want_log:
                    self._check_time()
                if cfg.checkpoints and self.window_backward == 0 and run_backward and (
                    self.opt_step % cfg.ckpt_every == 0 or self._done()
                ):
                    self.save()
                if self._done():
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            break
        if self.window_backward:  # the end of training cut an accumulation window short
            self._step_optimizer()
        if cfg.checkpoints:
            self.save()
            self.save(self.out / "final.pt")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t_start
        self.close()
        return {
            "opt_steps": self.opt_step,
            "micro_steps": self.micro_step,
            "samples": samples_seen,
            "seconds": elapsed,
            "gate": self.gate.stats(),
            **self.timing,
        }
