"""What the subcommands share: argument groups (data, training, teacher), the training
config and dataset they build from parsed arguments, and strict-JSON printing."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from ..engine import DEFAULT_GPU_BATCH, TrainConfig
from ..errors import DistillUsageError
from ..models import load_spec, parse_overrides

FASTSAM3D_TEACHER = "sam-med3d-turbo-fastsam3d-block"


def _add_data(p: argparse.ArgumentParser, augment_default: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        action="append",
        default=[],
        help="nnU-Net dataset folder (imagesTr/labelsTr) or a list file of "
        "'image label' lines; repeatable",
    )
    g.add_argument("--classes", type=int, nargs="*", help="label values to use (default: all)")
    g.add_argument(
        "--min-voxels", type=int, default=100, help="skip structures smaller than this many voxels"
    )
    g.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="use N in-memory synthetic phantoms instead of --data (demos, tests)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=augment_default,
        help="random flips + intensity jitter (MONAI)",
    )
    g.add_argument(
        "--lattice-anchor",
        choices=["centre", "corner"],
        default="centre",
        help="1.5 mm lattice variant (fastsam3d.geometry.Lattice); match the "
        "session's lattice_anchor",
    )
    g.add_argument(
        "--prepared",
        default=None,
        metavar="DIR",
        help="crops written by `prepare` (memory-mapped; instead of decoding the "
        "NIfTI files in every epoch); refused when stale or made with another "
        "--lattice-anchor/--classes/--min-voxels",
    )


def _add_train(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="run folder (checkpoints, metrics, tensorboard)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per process (default: 1 on CPU; on CUDA the per-GPU batch where an "
        "H200's throughput levels off: "
        f"{DEFAULT_GPU_BATCH} by stage)",
    )
    g.add_argument("--accum", type=int, default=1, help="backward passes per optimiser step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps")
    g.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        help="clip the global gradient norm (0 = off; recipe default: 0 released/"
        "paper, 1.0 ours: unclipped, lr 8e-4 at batch 16 in bf16 spiked by "
        "10^4x on an H200)",
    )
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    g.add_argument("--seed", type=int, default=2023)
    g.add_argument("--ckpt-every", type=int, default=100, help="optimiser steps")
    g.add_argument("--log-every", type=int, default=10, help="micro-batches")
    g.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers per process; for --prepared without --augment, reading "
        "threads (0: 8)",
    )
    g.add_argument("--device", default="auto")
    g.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from <out>/last.pt when present",
    )
    g.add_argument(
        "--apply-changes",
        action="store_true",
        help="on resume, continue with changed settings (logged) instead of refusing",
    )
    g.add_argument(
        "--ddp-comm",
        choices=["fp32", "bf16"],
        default="fp32",
        help="gradient all-reduce precision under torchrun (bf16 halves the bytes)",
    )
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("backward gating (SkipGS-style)")
    g.add_argument(
        "--gate",
        action="store_true",
        help="skip backward passes of samples whose loss is at or below their running baseline",
    )
    g.add_argument("--gate-warmup", type=int, default=500, help="micro-batches without skipping")
    g.add_argument("--gate-threshold", type=float, default=0.0)
    g.add_argument(
        "--gate-min-backward",
        default="auto",
        help="'auto' (max(0.5, 1 - r/2)) or a share in [0, 1]",
    )
    g.add_argument(
        "--gate-mode",
        choices=["sample", "batch"],
        default="sample",
        help="sample: forward the batch without grad, backward only samples above "
        "their baseline (plus the budget); batch: skip whole micro-batches",
    )


def _train_config(a: argparse.Namespace, stage: str) -> TrainConfig:
    mb: float | str = a.gate_min_backward
    if mb != "auto":
        try:
            mb = float(mb)
        except ValueError:
            raise DistillUsageError(
                f"--gate-min-backward must be 'auto' or a number, got {mb!r}"
            ) from None
    if a.batch_size is None:
        cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
        a.batch_size = DEFAULT_GPU_BATCH[stage] if cuda else 1
    for name in ("batch_size", "accum", "epochs"):
        if getattr(a, name) < 1:
            raise DistillUsageError(f"--{name.replace('_', '-')} must be at least 1")
    return TrainConfig(
        ddp_comm=a.ddp_comm,
        gate_mode=a.gate_mode,
        apply_changes=a.apply_changes,
        out_dir=a.out,
        epochs=a.epochs,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        accum=a.accum,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps,
        grad_clip=a.grad_clip,
        precision=a.precision,
        seed=a.seed,
        ckpt_every=a.ckpt_every,
        log_every=a.log_every,
        num_workers=a.workers,
        device=a.device,
        resume=a.resume,
        gate=a.gate,
        gate_warmup=a.gate_warmup,
        gate_threshold=a.gate_threshold,
        gate_min_backward=mb,
        tensorboard=a.tensorboard,
        progress=a.progress,
    )


def _add_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint (SAM-Med3D-turbo layout), or fixture:NAME / "
        "random:NAME for tests (required unless --preset tiny)",
    )
    p.add_argument(
        "--preset",
        choices=["tiny"],
        default=None,
        help="tiny: a small fixture teacher and student for smoke runs",
    )
    p.add_argument(
        "--teacher-config",
        default="detect",
        help="config to run a teacher checkpoint with (block style!); detect (default): "
        "the network from the file's keys and shapes, with the FastSAM3D block unless the "
        f"file records another (the official file gives {FASTSAM3D_TEACHER}, what "
        "FastSAM3D's teacher ran)",
    )
    p.add_argument(
        "--teacher-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for fixture:/random: teachers (tiny tests)",
    )


def _teacher(a: argparse.Namespace, device: Any = "cpu") -> torch.nn.Module:
    spec = a.teacher
    if spec is None:
        raise DistillUsageError("give --teacher (a SAM-Med3D-turbo checkpoint) or --preset tiny")
    if spec.startswith(("fixture:", "random:")):
        return load_spec(spec, device, **parse_overrides(a.teacher_override))
    return load_spec(spec, device, config=a.teacher_config)


def _dataset(a: argparse.Namespace, out: Path, labels: bool = True) -> Any:
    from ..data import CropDataset, TensorCropDataset, check_grids, discover, index_samples

    if a.synthetic:
        from ..synthetic import synthetic_crops

        images, labs = synthetic_crops(a.synthetic, seed=a.seed)
        return TensorCropDataset(
            images,
            labs if labels else None,
            augment=a.augment,
            seed=a.seed,
            intensity=bool(getattr(a, "intensity_jitter", 0)),
        )
    if getattr(a, "prepared", None):
        from ..prepared import PreparedCropDataset

        ds = PreparedCropDataset(
            a.prepared,
            augment=a.augment,
            seed=a.seed,
            intensity=bool(getattr(a, "intensity_jitter", 0)),
            expect={
                "lattice_anchor": a.lattice_anchor,
                "classes": a.classes,
                "min_voxels": a.min_voxels,
            },
            labels=labels,
        )
        if a.data and [c for src in a.data for c in discover(src)] != ds.cases:
            raise ValueError(f"--prepared {a.prepared} was made from other cases than --data")
        return ds
    if not a.data:
        raise DistillUsageError("give --data (dataset folder or list file) or --synthetic N")
    cases = [c for src in a.data for c in discover(src)]
    check_grids(cases)
    samples = index_samples(
        cases, classes=a.classes, min_voxels=a.min_voxels, cache=out / "sample_index.json"
    )
    return CropDataset(
        cases,
        samples,
        augment=a.augment,
        seed=a.seed,
        anchor=a.lattice_anchor,
        intensity=bool(getattr(a, "intensity_jitter", 0)),
    )


def _plain(obj: Any) -> Any:
    """Strict JSON: NaN/inf become null (e.g. the gate's floor before it is known)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
