"""fastsam3d-distill: one subcommand per stage.

    fastsam3d-distill synth     --out data/Dataset001 --cases 8
    fastsam3d-distill prepare   --data data/Dataset001 --out data/prep001   (then --prepared)
    fastsam3d-distill cache     --teacher sam_med3d_turbo.pth --data data/Dataset001 --out feats
    fastsam3d-distill distill   --teacher sam_med3d_turbo.pth --data data/Dataset001 --out runs/s1
    fastsam3d-distill finetune  --model runs/s1/student.pth --data data/Dataset001 --out runs/s2
    fastsam3d-distill evaluate  --model runs/s2/model.pth --data data/Dataset002 --out runs/eval
    fastsam3d-distill export    --checkpoint runs/s2/last.pt --base runs/s1/student.pth --out m.pth

Training subcommands run under `torchrun --nproc_per_node N` unchanged (DDP) and resume from
<out>/last.pt when it exists.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from fastsam3d.errors import FastSAM3DError

from .distributed import init_distributed
from .engine import DEFAULT_GPU_BATCH, TrainConfig, Trainer
from .errors import DistillError, DistillUsageError
from .models import load_spec, parse_overrides
from .recipes import apply_preset, apply_recipe

FASTSAM3D_TEACHER = "sam-med3d-turbo-fastsam3d-block"


# ----------------------------------------------------------------------------- arguments


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
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
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
    from .data import CropDataset, TensorCropDataset, check_grids, discover, index_samples

    if a.synthetic:
        from .synthetic import synthetic_crops

        images, labs = synthetic_crops(a.synthetic, seed=a.seed)
        return TensorCropDataset(
            images,
            labs if labels else None,
            augment=a.augment,
            seed=a.seed,
            intensity=bool(getattr(a, "intensity_jitter", 0)),
        )
    if getattr(a, "prepared", None):
        from .prepared import PreparedCropDataset

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


# ----------------------------------------------------------------------------- commands


def cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import write_nnunet_dataset

    root = write_nnunet_dataset(
        a.out,
        n_cases=a.cases,
        seed=a.seed,
        shape=tuple(a.shape),
        spacing=tuple(a.spacing),
        oblique_deg=a.oblique,
    )
    print(f"wrote {a.cases} synthetic cases to {root}")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from .data import check_grids, discover, index_samples
    from .prepared import prepare_crops

    if not a.data:
        raise ValueError("give --data (dataset folder or list file)")
    cases = [c for src in a.data for c in discover(src)]
    check_grids(cases)
    out = Path(a.out)
    samples = index_samples(cases, classes=a.classes, min_voxels=a.min_voxels)
    if not samples:
        raise ValueError("no samples: every label is empty or filtered out")
    prepare_crops(
        cases,
        samples,
        out,
        anchor=a.lattice_anchor,
        classes=a.classes,
        min_voxels=a.min_voxels,
        workers=a.workers,
    )
    print(f"prepared {len(samples)} crops of {len(cases)} cases in {out}")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from .stage1 import cache_manifest, cache_teacher_features, needed_teacher_taps

    apply_preset(a)
    env = init_distributed(a.device)
    a.augment = False  # cached targets are only valid for the crops the teacher saw
    ds = _dataset(a, Path(a.out), labels=False)  # data errors before the teacher loads
    teacher = _teacher(a, env.device).image_encoder
    s_depth = int(parse_overrides(a.student_override).get("depth", 6))
    taps = needed_teacher_taps(s_depth, len(teacher.blocks))
    bf16 = a.precision == "bf16" or (a.precision == "auto" and env.device.type == "cuda")
    manifest = cache_manifest(a, ds, taps, len(teacher.blocks), bf16)
    cache_teacher_features(
        teacher,
        ds,
        a.out,
        taps,
        device=env.device,
        batch_size=a.batch_size,
        bf16=bf16,
        rank=env.rank,
        world=env.world,
        manifest=manifest,
    )
    if env.is_main:
        print(f"cached teacher features of {len(ds)} samples in {a.out}")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    import fastsam3d

    from .export import assemble_student, export_model
    from .stage1 import (
        CachedFeatureDataset,
        DistillTask,
        init_student_from_teacher,
        teacher_identity,
    )

    apply_preset(a)
    chosen = apply_recipe(a, "distill")
    cfg = _train_config(a, "distill")
    env = init_distributed(cfg.device)
    out = Path(a.out)
    torch.manual_seed(a.seed)
    if a.cache:
        ds = CachedFeatureDataset(a.cache, preload=a.cache_in_memory)
        ds.check_teacher(teacher_identity(a))
    else:
        ds = _dataset(a, out, labels=False)  # data errors before the teacher loads
    teacher = _teacher(a)
    s_cfg = fastsam3d.get_config(a.student, **parse_overrides(a.student_override))
    student = fastsam3d.build_model(s_cfg).image_encoder.train()
    if env.is_main:
        print(f"[distill] recipe {a.recipe}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    if a.init == "teacher":
        copied = init_student_from_teacher(student, teacher.image_encoder)
        if env.is_main:
            print(f"[distill] student initialised from the teacher: {len(copied)} tensors")
    common = dict(
        loss=a.loss,
        k_every_epochs=a.k_every_epochs,
        k_every_steps=a.k_every_steps,
        neck_weight=a.neck_weight,
        student_config=s_cfg,
    )
    if a.cache:
        task = DistillTask(student, None, teacher_depth=ds.meta["teacher_depth"], **common)
        if ds.teacher_taps != task.teacher_taps:
            raise DistillUsageError(
                f"cache {a.cache} holds teacher blocks {ds.teacher_taps}, this "
                f"student needs {task.teacher_taps}: re-run `cache`"
            )
    else:
        task = DistillTask(student, teacher.image_encoder, **common)
    result = Trainer(task, ds, cfg, env).fit()
    if env.is_main:
        model = assemble_student(task.student, s_cfg, teacher)
        paths = export_model(model, out / "student.pth", stage="distill")
        print(json.dumps(_plain(result), indent=1))
        print(f"[distill] student with the teacher's decoder: {', '.join(map(str, paths))}")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from .export import export_model
    from .stage2 import FinetuneTask

    chosen = apply_recipe(a, "finetune")
    cfg = _train_config(a, "finetune")
    env = init_distributed(cfg.device)
    out = Path(a.out)
    torch.manual_seed(a.seed)
    ds = _dataset(a, out, labels=True)  # data errors before the model loads
    if env.is_main:
        print(f"[finetune] recipe {a.recipe}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    model = load_spec(a.model, config=a.model_config, **parse_overrides(a.model_override))
    if a.box_prob > 0 and not model.prompt_encoder.supports_boxes:
        import fastsam3d

        box_model = fastsam3d.build_model(model.config, num_point_embeddings=4)
        missing, unexpected = box_model.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all("point_embeddings" in k for k in missing), missing
        model = box_model
        if env.is_main:
            print("[finetune] added box embeddings (point_embeddings.2/.3), newly initialised")
    model.train()
    task = FinetuneTask(
        model,
        n_clicks=a.clicks,
        policy=a.policy,
        box_prob=a.box_prob,
        seed=a.seed,
        clicks=a.click_rule,
        mask_only_rounds=a.mask_only_rounds,
        mask_only_draw=a.mask_only_draw,
        detach_prev=a.detach_prev,
        reduction=a.loss_reduction,
        lr_milestones=tuple(a.lr_milestones),
    )
    result = Trainer(task, ds, cfg, env).fit()
    if env.is_main:
        paths = export_model(model.eval(), out / "model.pth", stage="finetune")
        print(json.dumps(_plain(result), indent=1))
        print(f"[finetune] exported {', '.join(map(str, paths))}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .data import CropDataset, check_grids, discover, index_samples
    from .evaluate import evaluate_crops, evaluate_volumes, summarise, write_report

    apply_recipe(a, "evaluate")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cases = [c for src in a.data for c in discover(src)]
    prepared = None
    if a.prepared:  # the crops as `prepare` stored them: the same items as from the NIfTI files
        from .prepared import PreparedCropDataset

        prepared = PreparedCropDataset(
            a.prepared,
            expect={
                "lattice_anchor": a.lattice_anchor,
                "classes": a.classes,
                "min_voxels": a.min_voxels,
            },
        )
        if cases and cases != prepared.cases:
            raise DistillUsageError(
                f"--prepared {a.prepared} was made from other cases than --data"
            )
        cases = prepared.cases
    if not cases:
        raise DistillUsageError("give --data with held-out cases (or --prepared)")
    check_grids(cases)  # before any model work
    if prepared is not None:
        samples = prepared.samples
    else:
        samples = index_samples(cases, classes=a.classes, min_voxels=a.min_voxels)
    if not samples:
        raise DistillUsageError("no samples: every label is empty or filtered out")
    model = load_spec(a.model, device, config=a.model_config, **parse_overrides(a.model_override))
    results: dict[str, list] = {}
    if "crop" in a.grids:
        ds = (
            prepared
            if prepared is not None
            else CropDataset(cases, samples, anchor=a.lattice_anchor)
        )
        results["crop"] = evaluate_crops(
            model, ds, a.clicks, device, protocol=a.protocol, seed=a.seed
        )
    if "original" in a.grids:
        results["original"] = evaluate_volumes(
            model,
            cases,
            samples,
            a.clicks,
            device,
            lattice_anchor=a.lattice_anchor,
            protocol=a.protocol,
            seed=a.seed,
        )
    path = write_report(results, a.out)
    for grid, recs in results.items():
        s = summarise(recs)["overall"]
        print(f"{grid:9s} final {s['final']}  best {s['best']}")
    print(f"protocol {a.protocol}; wrote {path} and {Path(a.out) / 'evaluation.png'}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_model, model_from_training_checkpoint

    base = load_spec(a.base, config=a.base_config, **parse_overrides(a.base_override))
    model = model_from_training_checkpoint(a.checkpoint, base)
    paths = export_model(model, a.out, safetensors=a.safetensors)
    print(f"exported {', '.join(map(str, paths))}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastsam3d-distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic nnU-Net dataset (demos, smoke tests)")
    p.add_argument("--out", required=True, help="dataset folder to write (nnU-Net layout)")
    p.add_argument("--cases", type=int, default=8, help="number of phantom cases (default 8)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 96, 96],
        metavar=("K", "J", "I"),
        help="voxels per case, [k, j, i] (default 96 96 96)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.5, 1.5, 1.5],
        metavar="MM",
        help="voxel size in mm, i j k (default 1.5 1.5 1.5)",
    )
    p.add_argument(
        "--oblique", type=float, default=0.0, help="max rotation of the affine, degrees (default 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "prepare",
        help="decode every case once and store its training crops "
        "(memory-mapped .npy) for fast loading",
    )
    p.add_argument("--data", action="append", default=[], help="as for distill; repeatable")
    p.add_argument("--classes", type=int, nargs="*", help="label values to use (default: all)")
    p.add_argument("--min-voxels", type=int, default=100)
    p.add_argument("--lattice-anchor", choices=["centre", "corner"], default="centre")
    p.add_argument("--out", required=True, help="folder for images.npy, targets.npy, manifest")
    p.add_argument("--workers", type=int, default=0, help="processes decoding cases")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("cache", help="run the teacher once and store its targets")
    _add_teacher(p)
    _add_data(p, augment_default=False)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--student-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="only depth matters: which teacher blocks to keep",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="teacher precision (auto: bf16 on CUDA, fp32 on CPU, as online distillation runs it)",
    )
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("distill", help="stage 1: layer-wise progressive encoder distillation")
    _add_teacher(p)
    p.add_argument("--student", default="fastsam3d", help="student config name")
    p.add_argument("--student-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--recipe",
        choices=["released", "paper", "ours"],
        default="released",
        help="defaults for --loss/--init/--grad-clip/--neck-weight (docs/distill.md)",
    )
    p.add_argument(
        "--init",
        choices=["teacher", "random"],
        default=None,
        help="student initialisation (released/paper: random; ours: from the "
        "teacher, a warm start)",
    )
    p.add_argument(
        "--loss",
        choices=["paper", "paper-mse", "neck", "released-tap"],
        default=None,
        help="paper: (1/k) sum ||t_2i - s_i|| as printed; paper-mse "
        "(ours): mean MSE over k pairs + neck; neck: released HEAD; released-tap",
    )
    p.add_argument(
        "--neck-weight",
        type=float,
        default=None,
        help="weight of the neck MSE added by --loss paper-mse (ours: 1)",
    )
    p.add_argument(
        "--k-every-epochs",
        type=int,
        default=3,
        help="progressive schedule: one more matched block every N epochs",
    )
    p.add_argument("--k-every-steps", type=int, default=0, help="... or every N optimiser steps")
    p.add_argument("--cache", help="feature cache folder written by `cache` (else online)")
    p.add_argument("--cache-in-memory", action="store_true", help="read the whole cache once")
    _add_data(p, augment_default=False)
    _add_train(p, lr=8e-4)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("finetune", help="stage 2: prompt encoder + decoder with simulated clicks")
    p.add_argument("--model", required=True, help="full model (e.g. <distill out>/student.pth)")
    p.add_argument("--model-config", default=None, help="config name overriding detection")
    p.add_argument("--model-override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--recipe",
        choices=["released", "paper", "ours"],
        default="released",
        help="defaults for the click options below (docs/distill.md)",
    )
    p.add_argument(
        "--clicks", type=int, default=None, help="click rounds per sample (released: 11)"
    )
    p.add_argument(
        "--click-rule",
        choices=["released", "ours"],
        default=None,
        help="released: uniform voxel of FN∪FP; ours: inner half of the largest error component",
    )
    p.add_argument(
        "--mask-only-rounds",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="released: a random round in [2,8] and the last get no click",
    )
    p.add_argument(
        "--mask-only-draw",
        choices=["batch", "sample"],
        default="batch",
        help="draw the random mask-only round once per optimiser step (batch, as released: "
        "one decoder pass per round) or per sample (two passes where samples differ)",
    )
    p.add_argument(
        "--detach-prev",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cut the gradient through the fed-back logits (released: no)",
    )
    p.add_argument(
        "--loss-reduction",
        choices=["sum", "mean"],
        default=None,
        help="over rounds (released: sum)",
    )
    p.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        default=None,
        help="epochs where the LR drops x0.1 (released: 60 90)",
    )
    p.add_argument(
        "--intensity-jitter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add intensity scale/shift to the flips (released: flips only)",
    )
    p.add_argument(
        "--policy",
        choices=["newest", "accumulate"],
        default=None,
        help="how clicks reach the decoder (default: the model config's)",
    )
    p.add_argument(
        "--box-prob",
        type=float,
        default=0.0,
        help="share of batches prompted with the box too (trains box embeddings)",
    )
    _add_data(p, augment_default=True)
    _add_train(p, lr=8e-5)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="click-simulation Dice on held-out cases")
    p.add_argument("--model", required=True, help="model checkpoint to score (.pth/.safetensors)")
    p.add_argument("--model-config", default=None, help="config name overriding detection")
    p.add_argument(
        "--model-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (tests)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help="held-out dataset folder or case list (repeatable)",
    )
    p.add_argument("--classes", type=int, nargs="*", help="label values to score (default: all)")
    p.add_argument(
        "--min-voxels",
        type=int,
        default=100,
        help="skip structures smaller than this on the original grid (default 100)",
    )
    p.add_argument(
        "--prepared",
        default=None,
        metavar="DIR",
        help="held-out crops written by `prepare` (the same crops, without decoding the NIfTI "
        "files; the original grid still reads them); must match --lattice-anchor, "
        "--classes and --min-voxels",
    )
    p.add_argument("--clicks", type=int, default=10, help="clicks per structure (default 10)")
    p.add_argument(
        "--recipe",
        choices=["released", "paper", "ours"],
        default="released",
        help="sets the click protocol (default released)",
    )
    p.add_argument(
        "--protocol",
        choices=["released", "ours"],
        default=None,
        help="released: clicks 1-2 RITM, then uniform random error voxels, seeded; "
        "ours: deterministic interior / largest-error centre",
    )
    p.add_argument("--seed", type=int, default=2023, help="click seed (default 2023)")
    p.add_argument(
        "--lattice-anchor",
        choices=["centre", "corner"],
        default="centre",
        help="crop lattice (default centre; corner = the pre-2025 torchio grid)",
    )
    p.add_argument(
        "--grids",
        nargs="+",
        choices=["crop", "original"],
        default=["crop", "original"],
        help="where Dice is scored (default both)",
    )
    p.add_argument("--out", required=True, help="folder for the JSON and PNG results")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="training checkpoint -> official .pth + .safetensors")
    p.add_argument("--checkpoint", required=True, help="<run>/last.pt or final.pt")
    p.add_argument(
        "--base",
        required=True,
        help="after distill: the teacher (decoder source); after finetune: the "
        "model it started from (encoder source)",
    )
    p.add_argument("--base-config", default=None, help="config name for a --base checkpoint")
    p.add_argument(
        "--base-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for fixture:/random: bases (tests)",
    )
    p.add_argument("--out", required=True, help="output .pth")
    p.add_argument("--safetensors", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_export)
    return ap


# Input problems (exit status 2, one line on stderr); anything else is a bug and keeps its
# traceback. fastsam3d's own input errors (VolumeError, CheckpointError...) are included.
USER_ERRORS = (
    DistillError,
    FastSAM3DError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _plain(obj: Any) -> Any:
    """Strict JSON: NaN/inf become null (e.g. the gate's floor before it is known)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    """Run one command: the one place that maps errors to stderr and exit statuses."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # checkpoints are atomic: the last complete one is kept
        print(f"fastsam3d-distill {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:  # a problem with the input: one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fastsam3d-distill {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
