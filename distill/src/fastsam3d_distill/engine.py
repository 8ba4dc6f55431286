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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastsam3d.atomic import atomic_path

from .distributed import (
    DistEnv,
    ResumableDistributedSampler,
    align_param_layout,
    all_gather_objects,
    bf16_allreduce_hook,
    init_distributed,
)
from .gating import BackwardGate
from .loading import EpochBatches, EpochDataset, collate, to_device, worker_context
from .state import CKPT_FORMAT, atomic_save, load_training_checkpoint, rng_state, set_rng_state

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
    gate_mode: str = "sample"  # "sample": backward only samples above baseline; "batch": whole
    ddp_comm: str = "fp32"  # gradient all-reduce precision: "fp32" | "bf16" (compression hook)
    prefetch: int = 4  # batches each DataLoader worker keeps ready
    apply_changes: bool = False  # resume: apply changed hyper-parameters (else refuse)


# Default per-GPU batch on CUDA, per stage: where an H200's throughput has levelled off and the
# GPU, not the host's kernel launches, bounds a step (stage 2 at 32 per GPU scaled 1.86x on two
# H200s, at 64 2.05x; docs/benchmarks.md); on CPU the default is 1.
DEFAULT_GPU_BATCH = {"distill": 64, "finetune": 64}

# Reading threads for prepared crops when --workers is 0: 14 threads read ~4300 crops/s on an
# H200 host, a GPU takes ~1000/s in online stage 1 (docs/benchmarks.md); 8 keep a margin.
PREFETCH_THREADS = 8

# Settings a resumed run may change freely (how it runs, not what it computes).
RESUME_FREE = frozenset(
    {
        "out_dir",
        "epochs",
        "max_steps",
        "batch_size",
        "ckpt_every",
        "log_every",
        "num_workers",
        "device",
        "resume",
        "tensorboard",
        "progress",
        "timing",
        "max_micro_steps",
        "max_seconds",
        "checkpoints",
        "prefetch",
        "apply_changes",
        "ddp_comm",
    }
)


class Task(nn.Module):
    """A stage's trainable part. ``forward(batch)`` returns per-sample losses, shape (B,)."""

    name = "task"
    find_unused = True  # DDP: some parameters may get no gradient in a step
    # DDP static_graph: the same parameters get gradients in every step (set by tasks that know)
    static_graph = False

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Work outside DDP and outside autograd (frozen teacher, cached-target loading)."""
        return batch

    def set_progress(self, epoch: int, step: int) -> None:
        """Called before each micro-batch (progressive schedules)."""

    def scalars(self) -> dict[str, float]:
        return {}

    def lr_factor(self, step: int, epoch: int) -> float:
        """The task's LR schedule as a multiplier (constant unless a recipe says otherwise)."""
        return 1.0

    def meta(self) -> dict[str, Any]:
        """JSON-able facts needed to rebuild the model from a checkpoint (configs)."""
        return {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen_")}


def _select(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The sub-batch of ``rows`` (tensors by first dimension, lists by position)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            out[k] = v[torch.as_tensor(rows, device=v.device)]
        elif isinstance(v, list):
            out[k] = [v[r] for r in rows]
        else:
            out[k] = v
    return out


class Trainer:
    """Runs a Task over a dataset; see the module docstring for the guarantees.

    Throughput: DDP is built lazily at the first batch, after one probe backward has aligned
    parameter strides with gradient strides (``align_param_layout``), with gradient bucket
    views, ``static_graph`` where the task declares it and nothing is gated, and an optional
    bf16 all-reduce (``ddp_comm``). Nothing waits for the GPU between log records: losses
    (and the wall-time stop flag) are gathered on the device, copied to pinned memory without
    blocking, and read one log interval later, timed with CUDA events.
    """

    def __init__(
        self,
        task: Task,
        dataset: Dataset,
        cfg: TrainConfig,
        env: DistEnv | None = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
    ):
        self.cfg = cfg
        # Called with the trainer before each micro-batch, when it starts (``opt_step``,
        # ``window_backward`` and ``epoch`` say where): progress hooks, and the resume tests'
        # SIGKILL at a chosen step (Testing/distill/kill_at_step.py).
        self.callbacks = list(callbacks)
        self.env = env or init_distributed(cfg.device)
        self.task = task.to(self.env.device)
        self.dataset = dataset
        self.out = Path(cfg.out_dir)
        prec = cfg.precision
        if prec == "auto":
            prec = "bf16" if self.env.device.type == "cuda" else "fp32"
        if prec not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16, fp32 or auto, got {cfg.precision!r}")
        if cfg.ddp_comm not in ("fp32", "bf16"):
            raise ValueError(f"ddp_comm must be fp32 or bf16, got {cfg.ddp_comm!r}")
        if cfg.gate_mode not in ("sample", "batch"):
            raise ValueError(f"gate_mode must be sample or batch, got {cfg.gate_mode!r}")
        self.precision = prec
        params = [p for p in self.task.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"task {task.name!r} has no trainable parameters")
        fused = self.env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused
        )
        # A plain function (not a bound method), so the scheduler's state_dict stores no closure.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self._lr_factor(s)
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
        self.sample_gate = cfg.gate and cfg.gate_mode == "sample"
        self.ddp: nn.Module | None = None  # built at the first batch (_setup_ddp)
        self.layout_changed: list[str] = []
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
        self._loader: DataLoader | None = None
        self._prefetcher: Any = None  # prefetch.BatchPrefetcher for direct_read datasets
        self._batch_sampler = EpochBatches(self.sampler)
        self._pending: list[dict[str, Any]] = []
        self._t_start = time.perf_counter()
        self._t0_event: Any = None
        self._out_of_time = False
        self._resumed_micro = 0
        self.grad_norm: torch.Tensor | None = None

    def _lr_factor(self, step: int) -> float:
        """LR multiplier: linear warm-up, then the task's schedule (constant by default)."""
        warm = max(self.cfg.warmup_steps, 0)
        factor = min(1.0, (step + 1) / warm) if warm else 1.0
        return factor * self.task.lr_factor(step, getattr(self, "epoch", 0))

    # -- checkpointing ---------------------------------------------------------------------

    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    def state(self) -> dict[str, Any]:
        rngs = all_gather_objects(self.env, rng_state())
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

    def _changes(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from the checkpoint's run and change what it computes."""
        old_cfg = json.loads(ckpt["config"])
        new_cfg = json.loads(json.dumps(asdict(self.cfg)))
        changes = {
            k: (old_cfg.get(k), v)
            for k, v in new_cfg.items()
            if k not in RESUME_FREE and old_cfg.get(k) != v
        }
        old_meta = json.loads(ckpt.get("meta", "{}"))
        new_meta = json.loads(json.dumps(self.task.meta()))
        for k in sorted(set(old_meta) | set(new_meta)):
            if old_meta.get(k) != new_meta.get(k):
                changes[k] = (old_meta.get(k), new_meta.get(k))
        return changes

    def load(self, path: Path) -> None:
        ckpt = load_training_checkpoint(path)
        if ckpt["task"] != self.task.name:
            raise ValueError(
                f"{path} was written by stage {ckpt['task']!r}, not {self.task.name!r}"
            )
        p = ckpt["progress"]
        global_batch = self.cfg.batch_size * self.env.world
        if p["global_batch"] != global_batch:
            raise ValueError(
                f"{path}: the run used a global batch of {p['global_batch']} (batch size x "
                f"processes), this one {global_batch}; resume with the same global batch "
                "(e.g. 2 processes x 4 = 1 process x 8) or start a new --out"
            )
        changes = self._changes(ckpt)
        if changes and not self.cfg.apply_changes:
            listed = "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in sorted(changes.items()))
            )
            raise ValueError(
                f"{path}: this run's settings differ from the checkpoint's ({listed}); resume "
                "with the same settings, pass --apply-changes to continue with the new ones "
                "(logged), or start a new --out"
            )
        missing, unexpected = self.task.load_state_dict(ckpt["model"], strict=False)
        trainable = set(self.task.trainable_state_dict())
        if unexpected or (set(missing) & trainable):
            raise ValueError(
                f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
            )
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if changes:
            # The optimiser and schedule carry the old values: put the new ones in.
            for group in self.optimizer.param_groups:
                group.update(
                    weight_decay=self.cfg.weight_decay, betas=self.cfg.betas, initial_lr=self.cfg.lr
                )
            self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        self.epoch, self.batch_in_epoch = p["epoch"], p["batch_in_epoch"]
        self.opt_step, self.micro_step = p["opt_step"], p["micro_step"]
        self._resumed_micro = self.micro_step
        if changes:  # the LR must follow the new schedule from this step on
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = lr * self._lr_factor(self.opt_step)
        self.gate.load_state_dict(ckpt["gate"])
        rngs = ckpt["rng"]
        if p["world"] == self.env.world:
            set_rng_state(rngs[self.env.rank])
        elif self.env.is_main:
            print(
                f"[{self.task.name}] resuming a {p['world']}-process run on {self.env.world}: "
                "the global RNG streams restart (sampling, augmentation and clicks are "
                "seeded per sample and stay exact)"
            )
        if self.env.is_main:
            self._trim_metrics(self.micro_step)
            if changes:
                msg = {k: {"was": a, "now": b} for k, (a, b) in changes.items()}
                print(f"[{self.task.name}] resume: applying changed settings {json.dumps(msg)}")
                self._write_record(
                    {
                        "event": "resume",
                        "step": self.opt_step,
                        "micro_step": self.micro_step,
                        "changed": msg,
                    }
                )

    # -- logging ---------------------------------------------------------------------------

    def _trim_metrics(self, micro_step: int) -> None:
        """Drop records after the checkpoint (they will be replayed), so no step appears twice."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("micro_step", 0) <= micro_step:
                keep.append(line)
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(x + "\n" for x in keep))

    def _write_record(self, rec: dict[str, Any]) -> None:
        if self._jsonl is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()

    def _push_log(
        self, ids: Sequence[int], losses: torch.Tensor, scalars: dict[str, float], bar: Any
    ) -> None:
        """Queue a log record: gather on the device, copy without blocking, read it later."""
        dev = losses.device
        flag = float(
            self.env.is_main
            and bool(self.cfg.max_seconds)
            and time.perf_counter() - self._t_start > self.cfg.max_seconds
        )
        ids_t = torch.as_tensor(list(ids), dtype=torch.float64)
        if dev.type == "cuda":
            ids_t = ids_t.pin_memory().to(dev, non_blocking=True)
        local = torch.stack(
            [
                ids_t,
                losses.detach().double().reshape(-1),
                torch.full_like(losses.reshape(-1), flag, dtype=torch.float64),
            ]
        )
        if self.env.distributed:
            parts = [torch.empty_like(local) for _ in range(self.env.world)]
            dist.all_gather(parts, local)
            local = torch.cat(parts, dim=1)
        gn = (
            self.grad_norm
            if self.grad_norm is not None
            else torch.full((1,), float("nan"), device=dev)
        )
        payload = torch.cat([local.reshape(-1), gn.double().reshape(1)])
        rec: dict[str, Any] = {
            "step": self.opt_step,
            "micro_step": self.micro_step + 1,
            "epoch": self.epoch,
            "scalars": scalars,
            "n": local.shape[1],
        }
        if dev.type == "cuda":
            buf = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            buf.copy_(payload, non_blocking=True)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            rec.update(buf=buf, event=ev)
        else:
            rec.update(buf=payload, time=time.perf_counter() - self._t_start)
        self._pending.append(rec)
        self._drain(keep=1, bar=bar)

    def _drain(self, keep: int, bar: Any = None) -> None:
        """Turn all but the newest ``keep`` queued records into log lines (oldest first)."""
        while len(self._pending) > keep:
            rec = self._pending.pop(0)
            if "event" in rec:
                rec["event"].synchronize()
                t = self._t0_event.elapsed_time(rec["event"]) / 1000.0
            else:
                t = rec["time"]
            vals = rec["buf"]
            n = rec["n"]
            losses = vals[n : 2 * n].tolist()
            if bool(vals[2 * n] > 0):  # rank 0's wall-time flag: every rank stops here
                self._out_of_time = True
            gn = float(vals[-1])
            loss = float(np.mean(losses))
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4g}")
            self._log(
                {
                    "loss": loss,
                    "lr": rec["scalars"].pop("lr"),
                    "epoch": rec["epoch"],
                    **rec["scalars"],
                    **({"grad_norm": gn} if math.isfinite(gn) else {}),
                },
                step=rec["step"],
                micro_step=rec["micro_step"],
                t=t,
            )

    def _log(self, scalars: dict[str, float], step: int, micro_step: int, t: float) -> None:
        if not self.env.is_main:
            return
        rec = {"step": step, "micro_step": micro_step, "time": t, **scalars}
        self.history.append(rec)
        self._write_record(rec)
        if self.cfg.tensorboard:
            if self._writer is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is optional (e.g. on a bare GPU box)
                    self.cfg.tensorboard = False
                    return
                # purge_step: events of replayed steps (after a resume) are dropped.
                self._writer = SummaryWriter(str(self.out / "tb"), purge_step=self._resumed_micro)
            for k, v in scalars.items():
                self._writer.add_scalar(k, v, micro_step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._loader = None  # shuts persistent workers down
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # -- the loop --------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start_batch = self.batch_in_epoch
        self._batch_sampler.epoch = self.epoch
        if getattr(self.dataset, "direct_batches", False):  # device-resident (benchmarks)
            for idx in self.sampler.batches():
                yield self.dataset.get_batch(idx, self.epoch)  # type: ignore[attr-defined]
            return
        if getattr(self.dataset, "direct_read", False):  # prepared crops: threads, pinned
            if self._prefetcher is None:
                from .prefetch import BatchPrefetcher

                threads = self.cfg.num_workers or PREFETCH_THREADS
                self._prefetcher = BatchPrefetcher(
                    self.dataset, threads, self.cfg.prefetch, self.env.device
                )
            yield from self._prefetcher.run(self.sampler.batches())
            return
        if self._loader is None:
            workers = self.cfg.num_workers
            extra: dict[str, Any] = (
                {
                    "persistent_workers": True,
                    "prefetch_factor": self.cfg.prefetch,
                    "multiprocessing_context": worker_context(),
                }
                if workers > 0
                else {}
            )
            self._loader = DataLoader(
                EpochDataset(self.dataset),
                batch_sampler=self._batch_sampler,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=self.env.device.type == "cuda",
                **extra,
            )
        yield from self._loader

    def _gather(self, ids: Sequence[int], losses: torch.Tensor) -> tuple[list[int], list[float]]:
        """Every rank's (sample id, loss) pairs, in rank order; one small collective (waits)."""
        ids_t = torch.as_tensor(list(ids), dtype=torch.float64).to(losses.device)
        local = torch.stack([ids_t, losses.double().reshape(-1)])
        if self.env.distributed:
            parts = [torch.empty_like(local) for _ in range(self.env.world)]
            dist.all_gather(parts, local)
            local = torch.cat(parts, dim=1)
        arr = local.cpu()
        return [int(i) for i in arr[0].tolist()], arr[1].tolist()

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def _setup_ddp(self, batch: dict[str, Any], autocast: Any) -> None:
        """Wrap the task for DDP (not for sample gating, which all-reduces by hand)."""
        if not self.env.distributed or self.sample_gate:
            self.ddp = self.task
            return
        with autocast:  # probe: which strides do the gradients come out with?
            probe = self.task(batch)
        probe.float().mean().backward()
        self.layout_changed = align_param_layout(self.task)
        self.task.zero_grad(set_to_none=True)
        static = self.task.static_graph and not self.cfg.gate
        dev_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(
            self.task,
            device_ids=dev_ids,
            find_unused_parameters=self.task.find_unused and not static,
            gradient_as_bucket_view=True,
            static_graph=static,
            # No buffer changes in training (LayerNorms, constant positional tables): a
            # broadcast before every forward would only add a collective per step.
            broadcast_buffers=False,
        )
        if self.cfg.ddp_comm == "bf16":
            self.ddp.register_comm_hook(None, bf16_allreduce_hook)

    def _allreduce_grads(self, average: bool) -> None:
        """All-reduce gradients outside DDP in one flat collective. A parameter without a
        gradient on every rank keeps none (as in one process); one with a gradient on some
        rank gets zeros elsewhere before the sum."""
        params = [p for p in self.task.parameters() if p.requires_grad]
        dev = params[0].device
        has = torch.tensor([float(p.grad is not None) for p in params], device=dev)
        dist.all_reduce(has)
        grads = []
        for p, h in zip(params, has.tolist()):
            if h > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if not grads:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        if average:
            flat /= self.env.world
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)

    def _step_optimizer(self) -> None:
        if self.env.distributed and (self.window_unsynced or self.sample_gate):
            # Sample gating sums per-sample gradients normalised by the global count; a window
            # cut short by the end of training ran its last backward under no_sync: average.
            self._allreduce_grads(average=not self.sample_gate)
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

    def _micro_batch(self, batch: dict[str, Any], autocast: Any, want_log: bool, bar: Any) -> bool:
        """Forward (+ backward unless gated away) of one micro-batch; True if a backward ran."""
        cfg = self.cfg
        timing = cfg.timing
        t0 = time.perf_counter()
        scalars = {"lr": self.scheduler.get_last_lr()[0], **self.task.scalars()}
        if self.sample_gate:
            with torch.no_grad(), autocast:
                losses = self.task(batch)
            ids, vals = self._gather(batch["id"], losses)
            keep = self.gate.select(ids, vals)
            n_sel = sum(keep)
            b = len(batch["id"])
            mine = [j for j in range(b) if keep[self.env.rank * b + j]]
            t1 = time.perf_counter()
            self.timing["forward_s"] += t1 - t0
            if mine:
                with autocast:
                    sub = self.task(_select(batch, mine))
                (sub.float().sum() / (n_sel * cfg.accum)).backward()
            ran = n_sel > 0
            self.window_backward += int(ran)
            if want_log:
                self._push_log(batch["id"], losses, {**scalars, **self.gate.stats()}, bar)
            if timing:
                self._sync()
            self.timing["backward_s"] += time.perf_counter() - t1
            return ran
        last_in_window = self.window_backward + 1 >= cfg.accum
        no_sync = self.env.distributed and not last_in_window
        assert self.ddp is not None
        ctx = self.ddp.no_sync() if no_sync else contextlib.nullcontext()  # type: ignore[operator]
        with ctx:
            with autocast:
                losses = self.ddp(batch)
            run_backward = True
            if cfg.gate:
                run_backward = self.gate.decide(*self._gather(batch["id"], losses.detach()))
            if timing:
                self._sync()
            t1 = time.perf_counter()
            self.timing["forward_s"] += t1 - t0
            if run_backward:
                (losses.float().mean() / cfg.accum).backward()
                self.window_backward += 1
                self.window_unsynced = no_sync
            if want_log:
                extra = self.gate.stats() if cfg.gate else {}
                self._push_log(batch["id"], losses.detach(), {**scalars, **extra}, bar)
            del losses
            if timing:
                self._sync()
            self.timing["backward_s"] += time.perf_counter() - t1
        return run_backward

    def _check_out(self) -> None:
        """Refuse to mix a fresh run into a folder that holds another run's logs."""
        if self.cfg.resume and self.ckpt_path.exists():
            return
        old = [
            p.name
            for p in (self.out / "metrics.jsonl", self.out / "tb", self.ckpt_path)
            if p.exists()
        ]
        if old and self.cfg.resume and not self.ckpt_path.exists():
            # A run that died before its first checkpoint: nothing to resume, its logs go.
            self._trim_metrics(0)
            return
        if old:
            raise ValueError(
                f"{self.out} already holds a run ({', '.join(old)}) that this one would not "
                "resume; choose a new --out or remove it"
            )

    def fit(self) -> dict[str, Any]:
        """Train to the configured length, resuming from ``out_dir/last.pt`` when present."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.env.rank)
        if self.env.is_main:
            self._check_out()
        if cfg.resume and self.ckpt_path.exists():
            self.load(self.ckpt_path)
            if self.env.is_main:
                print(f"[{self.task.name}] resumed from {self.ckpt_path} at step {self.opt_step}")
        total = cfg.max_steps or math.ceil(cfg.epochs * self.sampler.batches_per_epoch / cfg.accum)
        bar = None
        if cfg.progress and self.env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.opt_step, desc=self.task.name, unit="step")
        autocast = torch.autocast(
            self.env.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        t_start = self._t_start = time.perf_counter()
        if self.env.device.type == "cuda":
            self._t0_event = torch.cuda.Event(enable_timing=True)
            self._t0_event.record()
        samples_seen = 0
        run_backward = False
        while self.epoch < cfg.epochs and not self._done():
            for batch in self._batches():
                for callback in self.callbacks:
                    callback(self)
                self.task.set_progress(self.epoch, self.opt_step)
                batch = to_device(batch, self.env.device)
                with torch.no_grad(), autocast:
                    batch = self.task.prepare(batch)
                if self.ddp is None:
                    self._setup_ddp(batch, autocast)
                if self.gate.note and self.env.is_main:
                    print(f"[{self.task.name}] warning: {self.gate.note}")
                    self.gate.note = ""
                want_log = (self.micro_step + 1) % cfg.log_every == 0
                run_backward = self._micro_batch(batch, autocast, want_log, bar)
                self.batch_in_epoch += 1
                self.micro_step += 1
                samples_seen += cfg.batch_size * self.env.world
                if self.window_backward >= cfg.accum:
                    t2 = time.perf_counter()
                    self._step_optimizer()
                    if cfg.timing:
                        self._sync()
                    self.timing["optimizer_s"] += time.perf_counter() - t2
                    if bar is not None:
                        bar.update(1)
                if (
                    cfg.checkpoints
                    and self.window_backward == 0
                    and run_backward
                    and (self.opt_step % cfg.ckpt_every == 0 or self._done())
                ):
                    self._drain(keep=0, bar=bar)  # every record up to here is on disk first
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
        self._drain(keep=0, bar=bar)
        if cfg.checkpoints:
            self.save()
            self.save(self.out / "final.pt")
        if bar is not None:
            bar.close()
        self._sync()
        elapsed = time.perf_counter() - t_start
        self.close()
        return {
            "opt_steps": self.opt_step,
            "micro_steps": self.micro_step,
            "samples": samples_seen,
            "seconds": elapsed,
            "gate": self.gate.stats(),
            "layout_aligned": self.layout_changed,
            **self.timing,
        }
