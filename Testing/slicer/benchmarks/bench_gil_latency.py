"""Click-to-written latency with a free main thread vs a Slicer-like one (GIL held in C++).

Real engine (``FastSAM3DEngine`` + ``fastsam3d.Session``, fixture weights, no download) on the
Lib's one inference thread. The main thread runs the loop of ``Testing/slicer/core/gil_loop.py``:

- ``free``: it blocks in a GIL-releasing wait (the best case; what a plain script does);
- ``slicer``: what the Widget does under Slicer, with C++ holding the GIL between timer ticks;
- ``legacy``: the Widget before the fix (a 30 ms timer whose poll never waits), capped.

Two back-ends drive the same ``ResultQueue.poll`` the Widget's timer drives: ``mrml`` (the full
``InteractiveLogic`` writing into a real MRML segment; needs slicer-core) and ``queue`` (the
Lib's ``ResultQueue`` writing into a numpy labelmap: for machines without slicer-core, e.g. the
lent GPU machine). Run: python3 Testing/slicer/benchmarks/bench_gil_latency.py --device cuda
--json Testing/slicer/benchmarks/results/gil_latency_h200_2026-11-30.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
for p in (HERE.parent / "core", REPO / "FastSAM3DSlicer", REPO / "model" / "src"):
    sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
from gil_loop import GAP_S, PUMP_S, click_to_written, future_done  # noqa: E402

from FastSAM3DSlicerLib.engine import FastSAM3DEngine  # noqa: E402
from FastSAM3DSlicerLib.waiting import POLL_WAIT_S, ResultQueue  # noqa: E402
from FastSAM3DSlicerLib.worker import InferenceWorker  # noqa: E402

SHAPE = (130, 256, 256)  # k, j, i
SPACING = (1.0, 1.0, 1.3)  # i, j, k mm


def has_slicer_core() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "vtkMRMLScene")


class MrmlTarget:
    """The full Lib: InteractiveLogic writing into a real MRML segment (slicer-core)."""

    name = "mrml"

    def __init__(self, engine: Any) -> None:
        from slicer_scene import build_scene

        from FastSAM3DSlicerLib.logic import InteractiveLogic

        self.scene = build_scene(shape_kji=SHAPE, spacing=SPACING)
        self.logic = InteractiveLogic(engine)
        self.poller = self.logic
        self.n = 0
        self.new_object()

    def new_object(self) -> None:
        self.n += 1
        seg = self.scene.segmentation.GetSegmentation().AddEmptySegment(f"s{self.n}", f"s{self.n}")
        self.logic.set_target(self.scene.volume, self.scene.segmentation, seg)

    def submit(self, offset: tuple, positive: bool) -> None:
        ijk = (128 + offset[0], 128 + offset[1], 65 + offset[2])
        self.logic.add_point(self.scene.world_of_ijk(ijk), positive)

    def close(self) -> None:
        self.logic.close()


@dataclasses.dataclass
class _Item:
    future: Any
    submitted: float


@dataclasses.dataclass
class _Written:
    total_s: float
    inference_s: float


class QueueTarget:
    """The Lib's ResultQueue (what the timer drives) on the Lib's worker, results pasted into a
    numpy labelmap: the same GIL path without MRML."""

    name = "queue"

    def __init__(self, engine: Any) -> None:
        from fastsam3d import bench, paste_result

        self.engine = engine
        self.worker = InferenceWorker()
        self.volume, self.centre = bench.synthetic_ct(SHAPE, SPACING)
        self.labelmap = np.zeros(SHAPE, np.uint8)
        self._paste = paste_result
        self.poller = ResultQueue(self._apply, lambda item, e: e)
        self.session = None
        self.new_object()

    def new_object(self) -> None:
        def build() -> Any:
            s = self.engine.new_session()
            s.set_volume(self.volume)
            return s

        self.ready = self.worker.submit(build)

    def _apply(self, item: _Item) -> _Written:
        result, inference_s = item.future.result()
        self._paste(result, self.labelmap)
        return _Written(time.perf_counter() - item.submitted, inference_s)

    def submit(self, offset: tuple, positive: bool) -> None:
        ras = self.centre + np.array(offset, float) * np.array(SPACING)
        ready = self.ready

        def click() -> tuple:
            session = ready.result()
            t0 = time.perf_counter()
            out = session.add_point(tuple(ras), positive)
            return out, time.perf_counter() - t0

        self.poller.append(_Item(self.worker.submit(click), time.perf_counter()))

    def close(self) -> None:
        self.poller.close()
        self.worker.shutdown()


def _load_engine(device: str) -> Any:
    """What 'Load model' does on the worker, with the fixture network: build the network,
    prepare the engine, warm one session (CUDA graphs, cuDNN plans)."""
    import fastsam3d.testing

    engine = FastSAM3DEngine.from_model(
        fastsam3d.testing.fixture_model("fastsam3d", device), device=device, propagate=False
    )
    engine.new_session()
    return engine


def one(target: Any, mode: str, offset: tuple, positive: bool, limit_s: float) -> dict:
    out, ticks = click_to_written(
        lambda: target.submit(offset, positive), target.poller, mode, limit_s=limit_s
    )
    if len(out) != 1 or isinstance(out[0], BaseException) or not hasattr(out[0], "total_s"):
        if target.poller.busy:  # legacy run cut at limit_s: drop the click, note it
            target.poller.wait()
            return {"mode": mode, "ms": None, "ticks": ticks, "cut_at_s": limit_s}
        raise RuntimeError(f"{mode} click failed: {out}")
    return {
        "mode": mode,
        "ms": 1000 * out[0].total_s,
        "net_ms": 1000 * out[0].inference_s,
        "ticks": ticks,
    }


def summary(rows: list, mode: str) -> dict:
    ms = [r["ms"] for r in rows if r["mode"] == mode and r["ms"] is not None]
    ticks = [r["ticks"] for r in rows if r["mode"] == mode]
    if not ms:
        return {"n": 0, "cut": len(ticks)}
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
        "median_ticks": statistics.median(ticks),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", choices=("auto", "mrml", "queue"), default="auto")
    ap.add_argument("--refinements", type=int, default=8, help="pairs of refinement clicks")
    ap.add_argument("--first", type=int, default=2, help="first clicks (new object) per mode")
    ap.add_argument("--legacy", type=int, default=1, help="legacy refinement clicks")
    ap.add_argument("--legacy-limit", type=float, default=20.0)
    ap.add_argument(
        "--loads",
        type=int,
        default=1,
        help="model loads (build + engine + warm session) per waiting mode",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    import fastsam3d.testing
    from fastsam3d import bench

    warnings.simplefilter("ignore", RuntimeWarning)
    backend = args.backend
    if backend == "auto":
        backend = "mrml" if has_slicer_core() else "queue"
    engine = FastSAM3DEngine.from_model(
        fastsam3d.testing.fixture_model("fastsam3d", args.device),
        device=args.device,
        propagate=False,
    )
    target = (MrmlTarget if backend == "mrml" else QueueTarget)(engine)
    rows: dict[str, list] = {"first": [], "refine": [], "legacy": []}
    t_start = time.perf_counter()
    # Warm the session (encoder, warm-up) outside the measurements.
    rows["first"].append({**one(target, "free", (0, 0, 0), True, 600), "warmup": True})
    for n in range(args.refinements):  # alternate the order: both modes see the same load
        modes = ("free", "slicer") if n % 2 == 0 else ("slicer", "free")
        for m, mode in enumerate(modes):
            off = ((n % 4) - 2 + m, 2, 1 - (n % 3))
            rows["refine"].append(one(target, mode, off, (n + m) % 3 != 2, 600))
    for n in range(args.legacy):
        rows["legacy"].append(one(target, "legacy", (1, 1 + n, 0), True, args.legacy_limit))
    for n in range(args.first):
        for mode in ("free", "slicer") if n % 2 == 0 else ("slicer", "free"):
            target.new_object()
            rows["first"].append(one(target, mode, (0, 0, 0), True, 600))
    target.close()
    rows["load"] = []
    worker = InferenceWorker()
    modes = ["free", "tick", "pumped"]
    for n in range(args.loads):  # model loading on the worker, waited for as the Widget may
        for mode in modes[n % 3 :] + modes[: n % 3]:  # rotate the order: same load for each
            future = worker.submit(_load_engine, args.device)
            s, ticks = future_done(future, mode)
            rows["load"].append({"mode": mode, "ms": 1000 * s, "ticks": ticks})
    worker.shutdown()
    first = [r for r in rows["first"] if not r.get("warmup")]
    dev = torch.device(engine.device)
    out = {
        **bench.environment(dev),
        "machine": platform.node() and platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "device_description": engine.device_info.description,
        "backend": backend,
        "volume_kji": list(SHAPE),
        "model": "fastsam3d, fixture weights (timing only)",
        "loop": {
            "gap_s": GAP_S,
            "pump_s": PUMP_S,
            "poll_wait_s": POLL_WAIT_S,
            "legacy_timer_s": GAP_S,
        },
        "refine": {m: summary(rows["refine"], m) for m in ("free", "slicer")},
        "first_click": {m: summary(first, m) for m in ("free", "slicer")},
        "legacy_refine": summary(rows["legacy"], "legacy"),
        "model_load": {m: summary(rows["load"], m) for m in ("free", "tick", "pumped")},
        "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    r = out["refine"]
    ratio = r["slicer"]["median_ms"] / r["free"]["median_ms"]
    out["refine_ratio_slicer_over_free"] = round(ratio, 3)
    print(
        json.dumps(
            {
                k: out[k]
                for k in (
                    "device_description",
                    "backend",
                    "refine",
                    "first_click",
                    "legacy_refine",
                    "model_load",
                    "refine_ratio_slicer_over_free",
                )
            },
            indent=1,
        )
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
