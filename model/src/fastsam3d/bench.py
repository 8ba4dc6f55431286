"""Benchmarks of the networks and the session: the reference's way against our exact and fast
paths, in one process on one device.

Modes:

* ``reference``: what the public code does: einsum attention with SAM-Med3D's windows
  materialised at 14^3, plain convolutions, dense PE recomputed per click, fp32, eager;
* ``exact``: our default kernels in fp32, eager (parity within 1e-4);
* ``fast``: :class:`fastsam3d.fastpath.Runner` with its automatic precision (on CUDA: bf16
  encoder, CUDA graphs); ``fast-compile`` adds ``torch.compile`` (opt-in, timed with its
  compile time).
* CPU paths (issue 14): ``int8`` (the int8 encoder through ONNX Runtime, click in PyTorch),
  ``ort-fp32`` / ``ort-int8`` (``Runner(backend="onnxruntime")``: encoder and click in ONNX
  Runtime); the graphs are exported once per weights into the user cache first.

Stages: encoder of each model; one click (prompt encoder + decoder); one click including the
paste of its mask into the crop's footprint on the original grid (:mod:`fastsam3d.clickpaste`);
the first mask of a new object in a CT-sized volume through :class:`fastsam3d.Session` (crop +
encoder + click + paste, upload excluded); a further click through the session (paste
included); batch-8 encoder throughput; peak GPU memory of a fast FastSAM3D session.

Timing: medians after warm-up; CUDA work is timed with CUDA events, never host clocks.
Results are plain dicts so they can be written as JSON and kept in the repository.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from . import geometry as geo
from .build import set_attention_backend
from .clickpaste import click_and_paste, crop_footprint, paste_field
from .device import resolve_device
from .fastpath import Runner
from .modeling import Sam3D
from .modeling.common import reference_kernels
from .session import Session
from .testing import fixture_model

MODES = ("reference", "exact", "fast")
CPU_MODES = ("int8", "ort-fp32", "ort-int8")
ALL_MODES = (*MODES, "fast-compile", *CPU_MODES)
CT_SHAPE = (300, 512, 512)  # [k, j, i]
CT_SPACING = (0.8, 0.8, 2.5)  # i, j, k in mm
TINY = {"depth": 2, "embed_dim": 96, "num_heads": 2, "num_attn_free_blocks": 1}


def _overrides_for(name: str, overrides: dict) -> dict:
    """``overrides`` made valid for config ``name``: a shallower encoder keeps its global
    attention blocks that still exist, or its last block global if none does (SAM-Med3D's
    global blocks 2, 5, 8, 11 do not exist in the 2-block ``--tiny`` encoder)."""
    depth = overrides.get("depth")
    if depth is None or "global_attn_indexes" in overrides:
        return overrides
    from .configs import get_config

    glob = get_config(name).global_attn_indexes
    kept = tuple(i for i in glob if i < depth) or ((depth - 1,) if glob else ())
    return {**overrides, "global_attn_indexes": kept}


# Goals of issue 6 (H200, batch 1), checked against the fast column.
GOALS_MS = {
    "encoder/fastsam3d": 0.30,
    "click+paste": 0.30,
    "first_mask": 5.0,
    "encoder/sam-med3d-turbo": 2.0,
}
GOAL_RATIOS = {"encoder/fastsam3d": 12.0, "click": 10.0}


def git_commit(path: Path | None = None) -> str:
    """Short commit of the checkout the code runs from (``FASTSAM3D_COMMIT`` when the code runs
    from a copy without git, e.g. on a lent GPU machine; else "unknown")."""
    if os.environ.get("FASTSAM3D_COMMIT"):
        return os.environ["FASTSAM3D_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=path or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "fastsam3d": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int,
    setup: Callable[[], object] | None = None,
) -> dict:
    """Median / p90 / min in milliseconds of ``fn`` (see :func:`sample_times`)."""
    times = sorted(sample_times(fn, device, repeats, warmup, setup))
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[math.ceil(0.9 * len(times)) - 1],
        "min_ms": times[0],
        "runs": repeats,
    }


def sample_times(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Per-call milliseconds of ``fn`` after warm-up: CUDA events on GPU (never host clocks
    around async work), perf_counter on CPU. ``setup`` runs before every call, outside the
    timed span (e.g. forgetting a cached crop)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    for _ in range(repeats):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _click_inputs(device: torch.device, points: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    coords = torch.randint(16, 112, (1, points, 3), generator=g).float().to(device)
    labels = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0][:points]], device=device)
    mask = torch.randn(1, 1, 32, 32, 32, generator=g).to(device)
    return coords, labels, mask


def _runner(model: Sam3D, device: torch.device, mode: str) -> Runner:
    set_attention_backend(model, "einsum" if mode == "reference" else "sdpa")
    if mode in ("reference", "exact"):
        return Runner(model, device, precision="fp32", graphs=False)
    if mode == "int8":
        return Runner(model, device, precision="int8")
    if mode.startswith("ort-"):
        return Runner(model, device, precision=mode[4:], backend="onnxruntime")
    return Runner(model, device, precision="auto", compile=mode == "fast-compile")


def _mode_context(mode: str):  # noqa: ANN202 - a context manager
    return reference_kernels(mode == "reference")


def synthetic_ct(
    shape: tuple[int, int, int] = CT_SHAPE, spacing: tuple[float, ...] = CT_SPACING, seed: int = 0
) -> Any:
    """A CT-like volume: soft tissue (HU ~40) with noise, a brighter sphere (the object) and
    air outside a body ellipse. Returns (Volume, RAS centre of the sphere)."""
    from .volume import Volume

    k, j, i = shape
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[:k, :j, :i]
    body = ((yy - j / 2) / (0.42 * j)) ** 2 + ((xx - i / 2) / (0.45 * i)) ** 2 <= 1.0
    arr = np.where(np.broadcast_to(body, shape), 40.0, -1000.0).astype(np.float32)
    c = np.array([k / 2, j / 2 + 0.1 * j, i / 2 - 0.1 * i])
    r_mm = 30.0
    sphere = (
        ((zz - c[0]) * spacing[2]) ** 2
        + ((yy - c[1]) * spacing[1]) ** 2
        + ((xx - c[2]) * spacing[0]) ** 2
    ) <= r_mm**2
    arr[sphere] = 160.0
    arr += rng.normal(0, 10, size=arr.shape).astype(np.float32)
    ijk_to_ras = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    ijk_to_ras[:3, 3] = [-i * spacing[0] / 2, -j * spacing[1] / 2, -k * spacing[2] / 2]
    vol = Volume(arr, ijk_to_ras)
    centre_ras = ijk_to_ras[:3, :3] @ c[::-1] + ijk_to_ras[:3, 3]
    return vol, centre_ras


def _median(res: dict) -> float:
    return res["median_ms"]


def bench_encoders(
    models: tuple[str, ...],
    device: torch.device,
    modes: tuple[str, ...],
    repeats: int,
    warmup: int,
    overrides: dict,
    batch: int,
) -> dict:
    stages: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(1)
    crop = torch.randn(1, 1, 128, 128, 128, generator=gen).to(device)
    crops = torch.randn(batch, 1, 128, 128, 128, generator=gen).to(device) if batch else None
    for name in models:
        model = fixture_model(name, device=device, **_overrides_for(name, overrides))
        enc: dict[str, dict] = {}
        thr: dict[str, dict] = {}
        for mode in modes:
            t0 = time.perf_counter()
            runner = _runner(model, device, mode)
            with _mode_context(mode):
                runner.encode(crop)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                prep = time.perf_counter() - t0
                enc[mode] = time_fn(lambda r=runner: r.encode(crop), device, repeats, warmup)
                enc[mode]["precision"] = runner.precision
                enc[mode]["prepare_s"] = round(prep, 3)
                if crops is not None and name == models[0]:
                    r = time_fn(
                        lambda r=runner: r.encode(crops), device, max(2, repeats // 4), warmup
                    )
                    r["volumes_per_s"] = batch / (r["median_ms"] / 1e3)
                    thr[mode] = r
            del runner
        stages[f"encoder/{name}"] = enc
        if thr:
            stages[f"encoder_batch{batch}/{name}"] = thr
        set_attention_backend(model, "sdpa")
        del model
        _free(device)
    return stages


def bench_clicks(
    name: str,
    device: torch.device,
    modes: tuple[str, ...],
    repeats: int,
    warmup: int,
    overrides: dict,
    volume_shape: tuple[int, int, int],
) -> dict:
    """One click, and one click with its paste into a CT crop's footprint."""
    model = fixture_model(name, device=device, **_overrides_for(name, overrides))
    vol, centre = synthetic_ct(volume_shape)
    lattice = geo.Lattice.for_volume(vol.ijk_to_ras, vol.shape)
    start = lattice.crop_start(centre)
    region, plan = crop_footprint(lattice, vol.ijk_to_ras, start, vol.shape, device=device)
    shape = tuple(s.stop - s.start for s in region)
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 384, 8, 8, 8, generator=gen).to(device)
    coords, labels, mask = _click_inputs(device)
    click: dict[str, dict] = {}
    paste: dict[str, dict] = {}
    for mode in modes:
        runner = _runner(model, device, mode)
        with _mode_context(mode):
            click[mode] = time_fn(
                lambda r=runner: r.click(emb, coords, labels, mask), device, repeats, warmup
            )
            if mode.startswith("fast"):

                def fn(r: Runner = runner) -> object:
                    return click_and_paste(r, emb, coords, labels, mask, plan)
            else:

                def fn(r: Runner = runner) -> object:
                    low, _ = r.click(emb, coords, labels, mask)
                    return paste_field(
                        geo.upsample_logits(low[:1, :1]), plan.axes, plan.mode, plan.tensors
                    )

            paste[mode] = time_fn(fn, device, repeats, warmup)
            paste[mode]["region_voxels"] = int(np.prod(shape))
        del runner
    set_attention_backend(model, "sdpa")
    return {"click": click, "click+paste": paste}


def bench_session(
    name: str,
    device: torch.device,
    modes: tuple[str, ...],
    repeats: int,
    warmup: int,
    overrides: dict,
    volume_shape: tuple[int, int, int],
) -> dict:
    """First mask of a new object and a further click, through the Session, per mode."""
    vol, centre = synthetic_ct(volume_shape)
    first: dict[str, dict] = {}
    further: dict[str, dict] = {}
    memory: dict[str, Any] = {}
    for mode in modes:
        if mode == "fast-compile":
            continue
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        model = fixture_model(name, device=device, **_overrides_for(name, overrides))
        runner = _runner(model, device, mode)
        t0 = time.perf_counter()
        if mode.startswith("fast"):
            runner.warmup()
        warm_s = time.perf_counter() - t0
        with _mode_context(mode):
            s = Session(runner, warmup=False, propagate=False)
            s.set_volume(vol)

            def forget(s: Any = s) -> None:
                if isinstance(getattr(s, "_embeddings", None), dict):
                    s.reset()
                    s._embeddings.clear()  # a new crop: the encoder runs again
                else:  # a session without that cache: a fresh volume forgets everything
                    s.set_volume(vol)

            first[mode] = time_fn(
                lambda s=s: s.add_point(centre, True), device, repeats, warmup, setup=forget
            )
            r = s.add_point(centre, True)
            first[mode]["mask_voxels"] = r.voxels

            def again(s: Any = s, count: list = [0]) -> None:  # noqa: B006 - a counter
                count[0] += 1
                offset = np.array([3.0, -3.0, 1.5]) * (count[0] % 5 - 2)
                s.add_point(centre + offset, count[0] % 2 == 0)

            further[mode] = time_fn(again, device, repeats, warmup)
            further[mode]["crops"] = len(s.crops)
        if device.type == "cuda" and mode == "fast":
            memory = {
                "peak_allocated_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
                "volume_on_device_mb": 4 * float(np.prod(volume_shape)) / 2**20,
                "warmup_s": round(warm_s, 3),
                "graphs": {str(k): round(v, 1) for k, v in runner.graphs.capture_ms.items()}
                if runner.graphs
                else {},
            }
        del s, runner, model
    _free(device)
    return {"stages": {"first_mask": first, "further_click": further}, "memory": memory}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios(stages: dict) -> dict:
    """reference / fast median per stage (how many times faster the fast path is)."""
    out = {}
    for stage, modes in stages.items():
        if "reference" in modes and "fast" in modes:
            out[stage] = _median(modes["reference"]) / _median(modes["fast"])
    return out


def goals(stages: dict, rat: dict, memory: dict) -> dict:
    out: dict[str, dict] = {}
    for stage, limit in GOALS_MS.items():
        if stage in stages and "fast" in stages[stage]:
            v = _median(stages[stage]["fast"])
            out[f"{stage} <= {limit} ms"] = {"value": v, "met": v <= limit}
    for stage, limit in GOAL_RATIOS.items():
        if stage in rat:
            out[f"{stage} ratio >= {limit}x"] = {"value": rat[stage], "met": rat[stage] >= limit}
    if memory:
        extra = memory["peak_allocated_mb"] - memory["volume_on_device_mb"]
        out["session peak <= 1 GB + volume"] = {"value": extra, "met": extra <= 1024}
    return out


def run(
    models: tuple[str, ...] = ("fastsam3d", "sam-med3d-turbo"),
    device: str = "auto",
    repeats: int = 100,
    warmup: int = 10,
    modes: tuple[str, ...] = MODES,
    batch: int = 8,
    session: bool = True,
    tiny: bool = False,
    volume_shape: tuple[int, int, int] | None = None,
) -> dict:
    """Every stage in every mode; ``tiny`` uses a 2-block encoder and a small volume (a smoke
    test of the machinery on CPU, not a measurement)."""
    dev = resolve_device(device)
    overrides = dict(TINY) if tiny else {}
    vshape = volume_shape or ((48, 96, 96) if tiny else CT_SHAPE)
    stages = bench_encoders(models, dev, modes, repeats, warmup, overrides, batch)
    stages.update(bench_clicks(models[0], dev, modes, repeats, warmup, overrides, vshape))
    memory: dict = {}
    if session:
        s = bench_session(models[0], dev, modes, repeats, warmup, overrides, vshape)
        stages.update(s["stages"])
        memory = s["memory"]
    rat = ratios(stages)
    return {
        "environment": environment(dev),
        "settings": {
            "models": list(models),
            "modes": list(modes),
            "repeats": repeats,
            "warmup": warmup,
            "batch": batch,
            "tiny": tiny,
            "volume_shape_kji": list(vshape),
            "volume_spacing_ijk_mm": list(CT_SPACING),
            "weights": "fixture recipe (latency does not depend on weight values)",
        },
        "stages": stages,
        "ratios": rat,
        "memory": memory,
        "goals": goals(stages, rat, memory) if dev.type == "cuda" and not tiny else {},
    }


def format_table(out: dict) -> str:
    """Markdown: one row per stage, one column per mode, plus reference/fast."""
    stages, rat = out["stages"], out["ratios"]
    modes = [m for m in ALL_MODES if any(m in v for v in stages.values())]
    lines = [
        "| stage | " + " | ".join(f"{m} (ms)" for m in modes) + " | reference/fast |",
        "|---|" + "---|" * (len(modes) + 1),
    ]
    for stage, res in stages.items():
        cells = " | ".join(_fmt(res[m]["median_ms"]) if m in res else "-" for m in modes)
        ratio = f"{rat[stage]:.1f}x" if stage in rat else "-"
        lines.append(f"| {stage} | {cells} | {ratio} |")
    for stage, res in stages.items():
        if stage.startswith("encoder_batch"):
            vps = ", ".join(f"{m} {res[m]['volumes_per_s']:.0f}" for m in modes if m in res)
            lines.append(f"\n{stage}: volumes/s: {vps}")
    if out.get("memory"):
        m = out["memory"]
        lines.append(
            f"\npeak GPU memory of a fast session: {m['peak_allocated_mb']:.0f} MB "
            f"allocated (volume {m['volume_on_device_mb']:.0f} MB of it), "
            f"{m['peak_reserved_mb']:.0f} MB reserved; warm-up {m['warmup_s']} s"
        )
    if out.get("goals"):
        lines.append("")
        for g, v in out["goals"].items():
            lines.append(f"goal {g}: {v['value']:.3f} -> {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)


def _fmt(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"
