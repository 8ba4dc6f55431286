"""Real-size distillation benchmark: FastSAM3D student from a SAM-Med3D-config teacher.

Measures, on one GPU (or several under torchrun with --ddp):

1. distillation throughput in volumes/s with the teacher online (bf16 autocast),
2. teacher feature extraction (the one-off cost of a cache) and throughput with cached features,
3. SkipGS-style backward gating: wall time to reach the ungated run's final loss,
4. the distillation loss curves.

Writes ``gpu_distill.json`` (+ ``gpu_distill.png`` when matplotlib is present) to --out.

    python distill/benchmarks/gpu_distill.py --out $OUT --minutes 8
    torchrun --nproc_per_node 2 distill/benchmarks/gpu_distill.py --ddp --global-batch 16 \
        --out $OUT --minutes 8          # issue 7: also with 1 and 4 processes, same global batch
    python distill/benchmarks/gpu_distill.py --smoke --out /tmp/smoke      # CPU, tiny, seconds

Only torch, numpy, fastsam3d and fastsam3d_distill are needed (no MONAI, scipy, tensorboard):
the crops are smooth random volumes generated on the device, the teacher has the parity-recipe
fixture weights (the official teacher cannot be downloaded there). Throughput is measured on
device-resident data (no host loading), after a warm-up, between synchronised time stamps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# NVLink multicast stays off (on shared hosts a multicast user can take GPUs out of service).
for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_k, _v)

HERE = Path(__file__).resolve()
for sub in ("model/src", "distill/src"):
    p = str(HERE.parents[2] / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastsam3d  # noqa: E402
from fastsam3d.geometry import znormalize  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402
from fastsam3d_distill.data import TensorCropDataset  # noqa: E402
from fastsam3d_distill.distributed import init_distributed  # noqa: E402
from fastsam3d_distill.engine import DEFAULT_GPU_BATCH, TrainConfig, Trainer  # noqa: E402
from fastsam3d_distill.stage1 import (  # noqa: E402
    CachedFeatureDataset,
    DistillTask,
    cache_teacher_features,
    init_student_from_teacher,
    needed_teacher_taps,
)

TEACHER = "sam-med3d-turbo-fastsam3d-block"
STUDENT = "fastsam3d"
TINY_T = dict(
    depth=4, embed_dim=32, num_heads=2, window_size=0, global_attn_indexes=(), out_chans=48
)
TINY_S = dict(depth=2, embed_dim=32, num_heads=2, num_attn_free_blocks=1, out_chans=48)


def make_crops(n: int, device: torch.device, seed: int = 0, size: int = 128) -> torch.Tensor:
    """Smooth random 'anatomy': low-frequency noise with blobs, a zero background outside a
    body ellipsoid, z-normalised over x > 0 by fastsam3d's own normaliser."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty(n, 1, size, size, size, device=device)
    ax = torch.linspace(-1, 1, size, device=device)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    for i in range(n):
        coarse = torch.randn(1, 1, 8, 8, 8, generator=g).to(device)
        fine = torch.randn(1, 1, 32, 32, 32, generator=g).to(device)
        vol = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)
        vol = vol + 0.2 * F.interpolate(
            fine, size=(size,) * 3, mode="trilinear", align_corners=False
        )
        r = torch.rand(3, generator=g).to(device) * 0.2 + 0.8
        body = (xx / r[0]) ** 2 + (yy / r[1]) ** 2 + (zz / r[2]) ** 2 <= 1
        vol = torch.where(body, 2.0 + vol[0, 0], torch.zeros((), device=device))
        out[i, 0] = znormalize(vol)
    return out


def smoothed(xs: list[float], window: int) -> list[float]:
    """Trailing moving average (window in log records)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def throughput(history: list[dict], batch_global: int) -> dict:
    """Volumes/s over the second half of the run (the first half absorbs warm-up, compile)."""
    if not history:
        return {"volumes_per_s": float("nan"), "measured_s": 0.0, "volumes": 0}
    half = 0.5 * history[-1]["time"]
    recs = [r for r in history if r["time"] >= half] or history[-2:]
    if len(recs) < 2:
        return {"volumes_per_s": float("nan"), "measured_s": 0.0, "volumes": 0}
    a, b = recs[0], recs[-1]
    vols = (b["micro_step"] - a["micro_step"]) * batch_global
    dt = b["time"] - a["time"]
    return {
        "volumes_per_s": vols / dt if dt > 0 else float("nan"),
        "measured_s": dt,
        "volumes": vols,
    }


def first_reach(hist: list[dict], sm: list[float], level: float, window: int) -> float | None:
    """Time at which the smoothed curve first reaches ``level`` (after one full window)."""
    return next(
        (h["time"] for n, (h, v) in enumerate(zip(hist, sm)) if n + 1 >= window and v <= level),
        None,
    )


def spikes(sm: list[float], window: int, factor: float = 10.0) -> int:
    """How often the smoothed loss jumps above ``factor`` x its best so far (instability)."""
    best, count, up = float("inf"), 0, False
    for n, v in enumerate(sm):
        if n + 1 < window:
            continue
        if v > factor * best and not up:
            count, up = count + 1, True
        elif v <= factor * best:
            up = False
        best = min(best, v)
    return count


def rebase(history: list[dict]) -> list[dict]:
    """Times relative to the first record, so one-off compile time does not enter ratios."""
    if not history:
        return history
    t0 = history[0]["time"]
    return [{**h, "time": h["time"] - t0} for h in history]


def maybe_compile(
    module: torch.nn.Module, enabled: bool, name: str, notes: list[str], probe
) -> None:
    """Compile in place and run ``probe(module)`` once (compilation is lazy: this is where it
    happens, outside the measured runs). Any failure reverts to eager and is recorded."""
    if enabled:
        try:
            module.compile(dynamic=False)
            probe(module)
            notes.append(f"{name}: torch.compile (in place), probed")
            return
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            module._compiled_call_impl = None
            notes.append(f"{name}: compile failed ({type(e).__name__}: {str(e)[:300]}); eager")
    probe(module)  # warm-up (cuDNN/cuBLAS heuristics, allocator) outside the measured runs


def run_phase(
    name: str,
    task: DistillTask,
    dataset,
    args,
    env,
    seconds: float,
    gate: bool = False,
    max_micro: int = 0,
    log_every: int = 0,
    workers: int = 0,
) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"gpu_distill_{name}_"))
    cfg = TrainConfig(
        out_dir=str(out),
        epochs=10**6,
        batch_size=args.batch,
        accum=1,
        lr=args.lr,
        ddp_comm=args.ddp_comm,
        num_workers=workers,
        gate_mode=args.gate_mode,
        weight_decay=0.1,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        precision="bf16" if args.bf16 else "fp32",
        seed=2023,
        log_every=log_every or args.log_every,
        device=str(env.device),
        resume=False,
        tensorboard=False,
        progress=False,
        checkpoints=False,
        max_seconds=seconds,
        max_micro_steps=max_micro,
        gate=gate,
        gate_warmup=args.gate_warmup,
        gate_threshold=args.gate_threshold,
        gate_min_backward=args.gate_min_backward
        if args.gate_min_backward == "auto"
        else float(args.gate_min_backward),
    )
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
    trainer = Trainer(task, dataset, cfg, env)
    res = trainer.fit()
    res["history"] = trainer.history
    if env.device.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return res


def nifti_dataset(root: Path, n_cases: int, shape: tuple[int, int, int], env) -> object:
    """A synthetic nnU-Net dataset on disk (NIfTI, gzip), written in parallel by rank 0,
    read back through the training loader (MONAI LoadImage, crop on the 1.5 mm lattice)."""
    from concurrent.futures import ProcessPoolExecutor

    from fastsam3d_distill.data import CropDataset, discover, index_samples

    if env.is_main and not (root / "labelsTr").exists():
        with ProcessPoolExecutor(max_workers=min(16, n_cases)) as pool:
            list(pool.map(_write_case, [(str(root), c, shape) for c in range(n_cases)]))
    if env.distributed:
        torch.distributed.barrier()
    cases = discover(root)
    samples = index_samples(cases, min_voxels=100, cache=root / f"index_{env.rank}.json")
    return CropDataset(cases, samples)


def prepared_dataset(
    root: Path, n_cases: int, shape: tuple[int, int, int], env, workers: int
) -> tuple[object, float]:
    """The NIfTI dataset of :func:`nifti_dataset`, prepared once by rank 0 (every case decoded
    once, crops stored memory-mapped) and opened by every rank; (dataset, prepare seconds)."""
    from fastsam3d_distill.prepared import PreparedCropDataset, prepare_crops

    nds = nifti_dataset(root, n_cases, shape, env)
    t0 = time.perf_counter()
    prep = root.parent / (root.name + "_prepared")
    if env.is_main:
        prepare_crops(nds.cases, nds.samples, prep, min_voxels=100, workers=workers * env.world)
    if env.distributed:
        torch.distributed.barrier()
    t_prep = time.perf_counter() - t0
    return PreparedCropDataset(prep, labels=False), t_prep


def _write_case(job: tuple[str, int, tuple[int, int, int]]) -> None:
    from fastsam3d_distill.synthetic import make_phantom, write_nifti

    root, c, shape = job
    ph = make_phantom(
        shape=shape, spacing=(1.0, 1.0, 1.0), seed=c, oblique_deg=5.0, n_ellipsoids=6, n_tubes=2
    )
    name = f"case_{c:03d}"
    write_nifti(
        ph,
        Path(root) / "imagesTr" / f"{name}_0000.nii.gz",
        Path(root) / "labelsTr" / f"{name}.nii.gz",
    )


def finetune_task(s_cfg, student0: torch.nn.Module, dev: torch.device):  # noqa: ANN001, ANN201
    """A fresh stage-2 task: the student encoder (frozen) + a new prompt encoder and decoder."""
    from fastsam3d_distill.stage2 import FinetuneTask

    torch.manual_seed(0)
    model = fastsam3d.build_model(s_cfg)
    model.image_encoder.load_state_dict(student0.state_dict())
    return FinetuneTask(model.to(dev).train(), n_clicks=11, clicks="released")


def gating_compare(name: str, make_task, dataset, args, env, seconds_for, objective: str) -> dict:  # noqa: ANN001
    """Time to equal loss with per-sample backward gating against without, same task, data and
    seeds; levels = the baseline's best smoothed loss by 25/50/75/100 % of its wall time."""
    base_task, gated_task = make_task(), make_task()
    # Every micro-batch is logged (the gate syncs each step anyway), so the smoothed curve
    # averages over whole epochs of distinct crops.
    base = run_phase(
        f"{name}_base", base_task, dataset, args, env, seconds_for(f"{name}_base"), log_every=1
    )
    gated = run_phase(
        f"{name}_gated",
        gated_task,
        dataset,
        args,
        env,
        seconds_for(f"{name}_gated"),
        gate=True,
        log_every=1,
    )
    del base_task, gated_task
    window = max(8, 4 * math.ceil(len(dataset) / (args.batch * env.world)))
    hb, hg = rebase(base["history"]), rebase(gated["history"])
    sb = smoothed([h["loss"] for h in hb], window)
    sg = smoothed([h["loss"] for h in hg], window)
    t_base = hb[-1]["time"] if hb else float("nan")
    # For each level, when did each run first reach it? Best-so-far levels keep loss spikes
    # from making a late, worse value the target.
    levels = {}
    for frac in (0.25, 0.5, 0.75, 1.0):
        vals = [
            v
            for n, (h, v) in enumerate(zip(hb, sb))
            if n + 1 >= window and h["time"] <= frac * t_base
        ]
        if vals:
            level = min(vals)
            tb = first_reach(hb, sb, level, window)
            tg = first_reach(hg, sg, level, window)
            levels[str(frac)] = {
                "loss": level,
                "baseline_s": tb,
                "gated_s": tg,
                "time_saved": (1 - tg / tb) if (tg is not None and tb) else None,
            }
    final = levels.get("1.0", {})
    at_base_time = [v for h, v in zip(hg, sg) if h["time"] <= t_base]
    out = {
        "objective": objective,
        "batch_per_process": args.batch,
        "gate_settings": {
            "mode": args.gate_mode,
            "warmup": args.gate_warmup,
            "threshold": args.gate_threshold,
            "min_backward": args.gate_min_backward,
        },
        "times": "seconds since each run's first log record (excludes compile/warm-up)",
        "smoothing_window_records": window,
        "levels": levels,
        "baseline": {
            "final_loss_smoothed": sb[-1] if sb else float("nan"),
            "best_loss_smoothed": final.get("loss"),
            "wall_s": t_base,
            "spikes": spikes(sb, window),
            "micro_steps": base["micro_steps"],
            "opt_steps": base["opt_steps"],
        },
        "gated": {
            "final_loss_smoothed": sg[-1] if sg else float("nan"),
            "wall_s": hg[-1]["time"] if hg else float("nan"),
            "micro_steps": gated["micro_steps"],
            "opt_steps": gated["opt_steps"],
            "time_to_baseline_best_loss_s": final.get("gated_s"),
            "spikes": spikes(sg, window),
            "loss_smoothed_at_baseline_wall_time": at_base_time[-1] if at_base_time else None,
            **gated["gate"],
        },
        "time_saved_at_equal_loss": final.get("time_saved"),
        "baseline_curve": [(h["micro_step"], h["time"], h["loss"]) for h in hb],
        "gated_curve": [
            (h["micro_step"], h["time"], h["loss"], h["gate/backward_share"]) for h in hg
        ],
    }
    if env.is_main:
        saved = out["time_saved_at_equal_loss"]
        print(
            f"[{name}] backward share {gated['gate']['gate/backward_share']:.2f}, time "
            f"saved at equal loss: {'not reached' if saved is None else f'{saved:.1%}'}",
            flush=True,
        )
    return out


def profile_steps(task, dataset, batch: int, steps: int, dev: torch.device) -> dict:  # noqa: ANN001
    """``steps`` plain training steps of ``task`` under torch.profiler (after two warm-up steps):
    GPU kernel time against wall time, host synchronisations, the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")

    def step(k: int) -> None:
        b = dataset.get_batch(list(range(k * batch, (k + 1) * batch)), 0)
        b = {key: (v.to(dev) if key != "id" else v.tolist()) for key, v in b.items()}
        with torch.no_grad(), autocast:
            b = task.prepare(b)
        with autocast:
            loss = task(b)
        loss.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = max(1, len(dataset) // batch)
    for k in range(2):
        step(k % n)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for k in range(steps):
            step(k % n)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in ka)
    syncs = {
        e.key: e.count
        for e in ka
        if "Synchronize" in e.key
        or e.key in ("cudaMemcpy", "aten::item", "aten::_local_scalar_dense")
    }
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return {
        "steps": steps,
        "batch": batch,
        "wall_s_per_step": wall / steps,
        "gpu_kernel_s_per_step": gpu_us / 1e6 / steps,
        "gpu_busy_fraction": gpu_us / 1e6 / wall if wall > 0 else None,
        "host_syncs": syncs,
        "table": ka.table(sort_by=sort, row_limit=14, max_name_column_width=60),
    }


def loader_rate(dataset, batch: int, workers: int, seconds: float, env) -> dict:
    """Volumes/s of the real input path alone (NIfTI -> crops, DataLoader workers), summed
    over ranks: each rank reads its own shard, as in training."""
    from torch.utils.data import DataLoader

    from fastsam3d_distill.loading import collate, worker_context

    n = len(dataset)
    idx = list(range(env.rank, n, env.world))
    order = [idx[(k * 7919) % len(idx)] for k in range(len(idx))]  # shuffled, no volume reuse
    batches = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)] * 50
    if getattr(dataset, "direct_read", False):  # what the trainer uses: threads, pinned, H2D
        from fastsam3d_distill.prefetch import BatchPrefetcher

        reader = BatchPrefetcher(dataset, workers, 4, env.device)
        it = reader.run(batches)
        next(it)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        t0, vols = time.perf_counter(), 0
        for b in it:
            vols += b["image"].shape[0]
            if time.perf_counter() - t0 > seconds:
                break
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)  # the last batch is on the device
        dt = time.perf_counter() - t0
        it.close()
        reader.close()
        rate = torch.tensor([vols / dt], dtype=torch.float64, device=env.device)
        if env.distributed:
            torch.distributed.all_reduce(rate)
        return {
            "reader": "threads into pinned memory, side-stream copy to the device",
            "threads_per_process": workers,
            "volumes_per_s": float(rate),
            "seconds": dt,
        }
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        multiprocessing_context=worker_context() if workers else None,
    )
    it = iter(loader)
    next(it)  # worker start-up is not the steady state
    t0, vols = time.perf_counter(), 0
    for b in it:
        vols += b["image"].shape[0]
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    dev = env.device if env.device.type == "cuda" else "cpu"
    rate = torch.tensor([vols / dt], dtype=torch.float64, device=dev)
    if env.distributed:
        torch.distributed.all_reduce(rate)  # gloo/nccl: sum over ranks
    del it, loader
    return {"workers_per_process": workers, "volumes_per_s": float(rate), "seconds": dt}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=8.0, help="total wall budget (approx.)")
    ap.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[DEFAULT_GPU_BATCH["distill"]],
        help="per-process batch sizes to measure (online + cached for each; the "
        "first also for gating and the NIfTI path)",
    )
    ap.add_argument(
        "--ddp-comm", choices=["fp32", "bf16"], default="fp32", help="gradient all-reduce precision"
    )
    ap.add_argument("--gate-mode", choices=["sample", "batch"], default="sample")
    ap.add_argument(
        "--ft-batches",
        type=int,
        nargs="+",
        default=[DEFAULT_GPU_BATCH["finetune"]],
        help="per-process batch sizes for the stage-2 (finetune) phase",
    )
    ap.add_argument("--nifti-cases", type=int, default=32, help="8 structures each")
    ap.add_argument("--nifti-shape", type=int, nargs=3, default=[160, 192, 160])
    ap.add_argument("--workers", type=int, default=14, help="DataLoader workers per process")
    ap.add_argument(
        "--nifti-dir",
        default="",
        help="where the NIfTI dataset goes (default: <tmp>/gpu_distill_nifti, "
        "shared by the ranks of one host)",
    )
    ap.add_argument(
        "--global-batch",
        type=int,
        default=0,
        help="fix the global batch instead (per-process = global / processes), for scaling runs",
    )
    ap.add_argument("--crops", type=int, default=64, help="distinct synthetic crops")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup-steps", type=int, default=100, help="linear LR warm-up")
    ap.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="global grad-norm clip (0 = off); without it lr 8e-4 at batch 16 in "
        "bf16 spiked by 10^4x on the H200",
    )
    ap.add_argument("--gate-warmup", type=int, default=100, help="micro-batches")
    ap.add_argument(
        "--ft-gate-warmup",
        type=int,
        default=24,
        help="micro-batches, stage 2 (its steps are ~10x slower than stage 1's)",
    )
    ap.add_argument(
        "--gate-threshold",
        type=float,
        default=0.0,
        help="skip when mean(loss/baseline) <= 1 + threshold",
    )
    ap.add_argument("--gate-min-backward", default="auto", help="'auto' or a share in [0, 1]")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ddp", action="store_true", help="launched by torchrun (multi-GPU)")
    ap.add_argument(
        "--phases",
        nargs="+",
        default=["online", "cached", "gating"],
        choices=["online", "cached", "gating", "ft_gating", "nifti", "prepared", "finetune"],
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile this many stage-2 steps after the finetune phase (1 process only)",
    )
    ap.add_argument("--name", default="", help="JSON file name (default gpu_distill[_ddpN].json)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configs, a few seconds")
    ap.add_argument(
        "--device",
        default="auto",
        help="auto: cuda (cpu with --smoke); 'cpu' runs the real sizes on the CPU",
    )
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.crops, args.compile = [2], 4, False
        args.nifti_cases, args.nifti_shape, args.workers = 2, [40, 44, 48], 1
        args.ft_batches = [2]
        args.log_every, args.gate_warmup, args.ft_gate_warmup = 1, 8, 4
        args.minutes = min(args.minutes, 0.5)
    if args.device == "auto":
        args.device = "cpu" if args.smoke else "cuda"
    env = init_distributed(args.device)
    # bf16 autocast on CUDA (the measured configuration); fp32 on CPU checks.
    args.bf16 = env.device.type == "cuda"
    if args.global_batch:
        if args.global_batch % env.world:
            raise SystemExit(
                f"--global-batch {args.global_batch} is not divisible by {env.world} processes"
            )
        args.batches = [args.global_batch // env.world]
    args.batch = args.batches[0]
    if args.ddp and env.world == 1 and env.is_main:
        print("[gpu_distill] --ddp given but WORLD_SIZE is 1: running single-process")
    dev = env.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60.0
    t_begin = time.perf_counter()
    notes: list[str] = []
    # Phase weights (the gated run gets 1.5x the baseline's time, to reach its loss if slower).
    weights: dict[str, float] = {}
    for b in args.batches:
        for ph in ("online", "cached"):
            if ph in args.phases:
                weights[f"{ph}@{b}"] = 1.0
    if "finetune" in args.phases:
        for b in args.ft_batches:
            weights[f"finetune@{b}"] = 1.0
    if "nifti" in args.phases:
        weights.update({"loader": 0.5, "nifti": 1.0})
    if "prepared" in args.phases:
        weights.update({"prep_loader": 0.3, "prepared": 1.5})  # after the prepare step
    if "gating" in args.phases:  # the long stage-1 run gets 1.5x stage 2's time
        weights.update({"gating_base": 1.5, "gating_gated": 2.25})
    if "ft_gating" in args.phases:
        weights.update({"ft_gating_base": 1.0, "ft_gating_gated": 1.5})
    args.crops = max(args.crops, 4 * max(args.batches + args.ft_batches) * env.world)

    def seconds_for(phase: str) -> float:
        """This phase's share of what is left of the budget (setup and compile included)."""
        left = max(budget - (time.perf_counter() - t_begin), 5.0)
        pending = [p for p in weights if weights[p] > 0]
        total = sum(weights[p] for p in pending)
        share = left * weights[phase] / total
        weights[phase] = 0.0
        return share

    t_over = TINY_T if args.smoke else {}
    s_over = TINY_S if args.smoke else {}
    teacher = fixture_model(TEACHER, device=dev, **t_over).image_encoder.eval()
    teacher.requires_grad_(False)
    s_cfg = fastsam3d.get_config(STUDENT, **s_over)
    torch.manual_seed(0)
    student0 = fastsam3d.build_model(s_cfg).image_encoder
    init_student_from_teacher(student0, teacher)
    student0 = student0.to(dev).train()
    images = make_crops(args.crops, dev, seed=1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)

    def probe_teacher(m: torch.nn.Module) -> None:
        with torch.no_grad(), autocast:
            m(images[: args.batch], return_taps=True)

    def probe_student(m: torch.nn.Module) -> None:
        with autocast:
            neck, taps = m(images[: args.batch], return_taps=True)
            loss = neck.float().pow(2).mean() + sum(t.float().pow(2).mean() for t in taps)
        loss.backward()
        m.zero_grad(set_to_none=True)

    student_notes: list[str] = []

    def fresh_task(
        teacher_or_none, k_start: int = 1, k_every_steps: int = 0, compile_: bool = True
    ) -> DistillTask:
        st = copy.deepcopy(student0)
        maybe_compile(st, args.compile and compile_, "student", student_notes, probe_student)
        return DistillTask(
            st,
            teacher_or_none,
            loss="paper-mse",
            k_start=k_start,
            k_every_steps=k_every_steps,
            teacher_depth=len(teacher.blocks),
            student_config=s_cfg,
        )

    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "world_size": env.world,
        "batches_per_process": args.batches,
        "crops": args.crops,
        "teacher": TEACHER + (" (tiny)" if args.smoke else ""),
        "student": STUDENT + (" (tiny)" if args.smoke else ""),
        "weights": "teacher: fastsam3d.testing parity recipe; student: initialised from it",
        "torch": torch.__version__,
        "compile": args.compile,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "notes": notes,
        "ddp": {
            "gradient_as_bucket_view": True,
            "comm": args.ddp_comm,
            "static_graph": "yes (paper-mse loss, no gating)",
        },
        "optimiser": {
            "name": "AdamW",
            "lr": args.lr,
            "weight_decay": 0.1,
            "warmup_steps": args.warmup_steps,
            "grad_clip": args.grad_clip,
        },
        "runs": {},
    }

    def timed_phase(name: str, task: object, dataset: object, workers: int = 0) -> dict:
        """Run one throughput phase; its volumes/s and loss curve (micro-step, s, loss, k)."""
        r = run_phase(name, task, dataset, args, env, seconds_for(name), workers=workers)
        res = {
            **throughput(r["history"], args.batch * env.world),
            "micro_steps": r["micro_steps"],
            "wall_s": r["seconds"],
            "peak_memory_gib": r.get("peak_memory_gib"),
            "layout_aligned": r.get("layout_aligned"),
            "loss_curve": [
                (h["micro_step"], h["time"], h["loss"], h["distill/k"]) for h in r["history"]
            ],
        }
        if env.is_main:
            print(
                f"[{name}] {res['volumes_per_s']:.1f} volumes/s, peak "
                f"{res['peak_memory_gib'] or 0:.1f} GiB",
                flush=True,
            )
        return res

    cached_ds = None
    for b in args.batches:
        args.batch = b
        run: dict = {"batch_per_process": b, "batch_global": b * env.world}
        result["runs"][str(b)] = run
        if b == args.batches[0]:
            maybe_compile(teacher, args.compile, "teacher", notes, probe_teacher)
        else:
            probe_teacher(teacher)  # a new shape recompiles here, outside the measured phase
        # 1. online teacher --------------------------------------------------------------
        if "online" in args.phases:
            ds = TensorCropDataset(images, device=dev)
            # Progressive schedule, one more matched block every 50 steps (a visible curve).
            task = fresh_task(teacher, k_every_steps=50)
            run["online"] = timed_phase(f"online@{b}", task, ds)
            del task
        # 2. cached features --------------------------------------------------------------
        if cached_ds is None and ("cached" in args.phases or "gating" in args.phases):
            cache_dir = Path(tempfile.mkdtemp(prefix="gpu_distill_cache_"))
            taps = needed_teacher_taps(s_cfg.depth, len(teacher.blocks))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            # Every process caches all crops into its own folder (no shared disk assumed).
            cache_teacher_features(
                teacher,
                TensorCropDataset(images.cpu()),
                cache_dir,
                taps,
                device=dev,
                batch_size=min(b, 16),
                bf16=args.bf16,
            )
            t_cache = time.perf_counter() - t0
            cached_ds = CachedFeatureDataset(cache_dir, preload=True, device=str(dev))
            per_vol = sum(v.numel() * v.element_size() for v in cached_ds.items[0].values())
            result["cache"] = {
                "seconds_incl_disk_and_compile": t_cache,
                "volumes": args.crops,
                "volumes_per_s_incl_disk": args.crops / t_cache,
                "bytes_per_volume": per_vol,
                "teacher_blocks_cached": taps,
            }
        if "cached" in args.phases:
            task = fresh_task(None, k_every_steps=50)
            run["cached"] = timed_phase(f"cached@{b}", task, cached_ds)
            del task
    args.batch = args.batches[0]
    first = result["runs"][str(args.batch)]
    for key in ("online", "cached"):  # the first batch size's phases, at the top level too
        if key in first:
            result[key] = first[key]

    # Stage 2: prompt encoder + decoder, released recipe (11 rounds, random error clicks on
    # the device, mask-only rounds, logits fed back with their gradient) ----------------------
    if "finetune" in args.phases:
        labels = (images > 0.5).float()  # blobby binary targets on the smooth volumes
        fds = TensorCropDataset(images, labels, device=dev)
        result["finetune"] = {}
        for b in args.ft_batches:
            args.batch = b
            task = finetune_task(s_cfg, student0, dev)
            r = run_phase(f"finetune@{b}", task, fds, args, env, seconds_for(f"finetune@{b}"))
            res = {
                **throughput(r["history"], b * env.world),
                "micro_steps": r["micro_steps"],
                "batch_per_process": b,
                "batch_global": b * env.world,
                "peak_memory_gib": r.get("peak_memory_gib"),
                "loss_curve": [(h["micro_step"], h["time"], h["loss"]) for h in r["history"]],
            }
            result["finetune"][str(b)] = res
            if env.is_main:
                print(
                    f"[finetune@{b}] {res['volumes_per_s']:.1f} volumes/s, peak "
                    f"{res['peak_memory_gib'] or 0:.1f} GiB",
                    flush=True,
                )
            if args.profile and b == args.ft_batches[0] and env.world == 1:
                result["finetune_profile"] = profile_steps(task, fds, b, args.profile, dev)
                if env.is_main:
                    print(result["finetune_profile"]["table"], flush=True)
            del task
        args.batch = args.batches[0]

    # NIfTI on disk -> DataLoader workers -> online distillation (the real input path) -------
    if "nifti" in args.phases:
        root = Path(args.nifti_dir or Path(tempfile.gettempdir()) / "gpu_distill_nifti")
        t0 = time.perf_counter()
        nds = nifti_dataset(root, args.nifti_cases, tuple(args.nifti_shape), env)
        t_write = time.perf_counter() - t0
        lr_ = loader_rate(nds, min(args.batch, 8), args.workers, seconds_for("loader"), env)
        task = fresh_task(teacher, k_every_steps=50)
        res = timed_phase("nifti", task, nds, workers=args.workers)
        del task
        result["nifti"] = {
            "cases": args.nifti_cases,
            "shape_kji": args.nifti_shape,
            "spacing_mm": 1.0,
            "samples": len(nds),
            "format": "nii.gz (float32 image, int16 label)",
            "write_and_index_s": t_write,
            "loader": lr_,
            "training": res,
        }
        if env.is_main:
            print(
                f"[loader] {lr_['volumes_per_s']:.1f} volumes/s with {args.workers} workers "
                "per process",
                flush=True,
            )

    # the same NIfTI files prepared once (`fastsam3d-distill prepare`): workers only slice
    if "prepared" in args.phases:
        root = Path(args.nifti_dir or Path(tempfile.gettempdir()) / "gpu_distill_nifti")
        t0 = time.perf_counter()
        pds, t_prep = prepared_dataset(
            root, args.nifti_cases, tuple(args.nifti_shape), env, args.workers
        )
        t_all = time.perf_counter() - t0
        lr_ = loader_rate(pds, args.batch, args.workers, seconds_for("prep_loader"), env)
        task = fresh_task(teacher, k_every_steps=50)
        res = timed_phase("prepared", task, pds, workers=args.workers)
        del task
        result["prepared"] = {
            "cases": args.nifti_cases,
            "shape_kji": args.nifti_shape,
            "samples": len(pds),
            "format": "images.npy float32 + targets.npy uint8, memory-mapped",
            "prepare_s": t_prep,
            "write_index_prepare_s": t_all,
            "loader": lr_,
            "training": res,
        }
        if env.is_main:
            print(
                f"[prepared] prepare {t_prep:.1f} s; loader {lr_['volumes_per_s']:.1f} "
                f"volumes/s with {args.workers} workers per process",
                flush=True,
            )

    # 3. gating at equal loss: stage 1 (cached features, fixed objective k = depth) and stage 2
    if "gating" in args.phases:
        depth = s_cfg.depth
        result["gating"] = gating_compare(
            "gating",
            # eager, as the CLI trains: the gate's sub-batches vary in size and would make a
            # shape-specialised compiled student recompile (seen: 7x slower gated steps)
            lambda: fresh_task(None, k_start=depth, compile_=False),
            cached_ds,
            args,
            env,
            seconds_for,
            f"paper loss, all {depth} block pairs + neck (fixed k)",
        )
    if "ft_gating" in args.phases:
        args.batch, warm = args.ft_batches[0], args.gate_warmup
        args.gate_warmup = args.ft_gate_warmup
        result["ft_gating"] = gating_compare(
            "ft_gating",
            lambda: finetune_task(s_cfg, student0, dev),
            TensorCropDataset(images, (images > 0.5).float(), device=dev),
            args,
            env,
            seconds_for,
            "stage 2, released clicks (11 rounds), summed DiceCE",
        )
        args.batch, args.gate_warmup = args.batches[0], warm

    notes.extend(sorted(set(student_notes)))
    result["total_wall_s"] = time.perf_counter() - t_begin
    if dev.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if env.is_main:
        default = f"gpu_distill_ddp{env.world}.json" if args.ddp else "gpu_distill.json"
        path = out / (args.name or default)
        path.write_text(json.dumps(result, indent=1))
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path}")
    if env.distributed:
        torch.distributed.destroy_process_group()
    return 0


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["notes"].append("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("online", "cached"):
        if key in result:
            c = np.array(result[key]["loss_curve"], dtype=float)
            axes[0].plot(
                c[:, 0],
                c[:, 2],
                label=f"{key} teacher features ({result[key]['volumes_per_s']:.0f} vol/s)",
            )
    axes[0].set_xlabel("micro-batch")
    axes[0].set_ylabel("distillation loss (progressive k)")
    axes[0].set_yscale("log")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    if "gating" in result:
        g = result["gating"]
        b = np.array(g["baseline_curve"], dtype=float)
        q = np.array(g["gated_curve"], dtype=float)
        axes[1].plot(b[:, 1], b[:, 2], label="every backward")
        axes[1].plot(q[:, 1], q[:, 2], label="SkipGS-style gating", alpha=0.8)
        if g["baseline"].get("best_loss_smoothed") is not None:
            axes[1].axhline(g["baseline"]["best_loss_smoothed"], ls=":", c="k", lw=0.8)
        axes[1].set_xlabel("wall time (s)")
        axes[1].set_ylabel("loss (all pairs)")
        axes[1].set_yscale("log")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    sys.exit(main())
