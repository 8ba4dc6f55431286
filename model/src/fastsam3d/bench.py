"""Benchmarks of the networks: the reference's way against our exact and fast paths, in one process.

Modes:

* ``reference``: what the public code does: einsum attention with SAM-Med3D's windows
  materialised at 14^3, plain convolutions, dense PE recomputed per click, fp32, eager;
* ``exact``: our default kernels in fp32 (parity within 1e-4);
* ``fast``: :class:`fastsam3d.fastpath.Runner` with its automatic precision.

Timing: medians after warm-up; CUDA work is timed with CUDA events, never host clocks.
Results are plain dicts so they can be written as JSON and kept in the repository.
"""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .build import set_attention_backend
from .fastpath import Runner, resolve_device
from .modeling.common import reference_kernels
from .testing import fixture_model

MODES = ("reference", "exact", "fast")


def git_commit(path: Path | None = None) -> str:
    """Short commit of the checkout the code runs from ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=path or Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
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
    return env


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median / p90 in milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "runs": repeats}


def _click_inputs(device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 128, (1, 3, 3), generator=g).float().to(device)
    labels = torch.tensor([[1, 0, 1]], device=device)
    mask = torch.randn(1, 1, 32, 32, 32, generator=g).to(device)
    return coords, labels, mask


def bench_model(
    name: str,
    device: torch.device,
    modes: tuple[str, ...] = MODES,
    repeats: int = 20,
    warmup: int = 3,
    click: bool = True,
) -> dict:
    """Encoder (and click) timings of one registered network in each mode."""
    model = fixture_model(name, device=device)
    crop = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1)).to(device)
    coords, labels, mask = _click_inputs(device)
    out: dict = {}
    for mode in modes:
        set_attention_backend(model, "einsum" if mode == "reference" else "sdpa")
        runner = Runner(model, device, precision="auto" if mode == "fast" else "fp32")
        with reference_kernels(mode == "reference"):
            emb = runner.encode(crop)
            res = {"precision": runner.precision,
                   "encoder": time_fn(lambda r=runner: r.encode(crop), device, repeats, warmup)}
            if click:
                res["click"] = time_fn(
                    lambda r=runner, e=emb: r.click(e, coords, labels, mask), device,
                    repeats * 3, warmup,
                )
        out[mode] = res
    set_attention_backend(model, "sdpa")
    return out


def format_table(results: dict) -> str:
    """A markdown table: one row per model and stage, one column per mode, plus speed-ups."""
    lines = ["| model | stage | " + " | ".join(f"{m} (ms)" for m in MODES) + " | ref/fast |",
             "|---|---|" + "---|" * (len(MODES) + 1)]
    for model, modes in results.items():
        for stage in ("encoder", "click"):
            vals = {m: modes[m][stage]["median_ms"] for m in MODES
                    if m in modes and stage in modes[m]}
            if not vals:
                continue
            cells = " | ".join(f"{vals[m]:.1f}" if m in vals else "-" for m in MODES)
            ratio = (f"{vals['reference'] / vals['fast']:.1f}x"
                     if "reference" in vals and "fast" in vals else "-")
            lines.append(f"| {model} | {stage} | {cells} | {ratio} |")
    return "\n".join(lines)


def run(
    models: tuple[str, ...] = ("fastsam3d", "sam-med3d-turbo"),
    device: str = "auto",
    repeats: int = 20,
    warmup: int = 3,
    modes: tuple[str, ...] = MODES,
) -> dict:
    dev = resolve_device(device)
    results = {name: bench_model(name, dev, modes, repeats, warmup, click=(i == 0))
               for i, name in enumerate(models)}
    return {"environment": environment(dev), "results": results}
