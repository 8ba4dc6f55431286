"""Load test of ``fastsam3d serve`` on loopback: N simulated users, every result checked.

Starts its own server (a subprocess on 127.0.0.1, fixture weights), then for each N: N users
(threads, one :class:`fastsam3d.RemoteSession` each) upload a volume, wait until all have
uploaded, then each makes 10 clicks and one undo, pausing a "think time" before each (the
interactive protocol; ``--think-ms 0`` is the closed-loop saturation protocol). Every result is
compared with a local :class:`fastsam3d.Session` that replayed the same prompts on the same
device beforehand. Reports click round-trip latency (p50/p95/p99, client-side: request,
queueing, network work, mask transfer and decoding), the server's own split of each prompt
(``Server-Timing``: wait for the lock and queue, inference, result encoding), throughput,
server memory (RSS and CUDA,
sampled from ``/v1/stats``) and the machine's load average. Bounded: ``--time-limit`` seconds
in all (levels not started by then are skipped), every request has a timeout, and the server
is stopped (SIGTERM, graceful drain; killed if it hangs) whatever happens.

    python model/benchmarks/serve_load.py --device cpu --shape 64,128,128 --users 1,8,32,64 \
        --out model/benchmarks/results/serve_load_<machine>_<date>.json
    python model/benchmarks/serve_load.py --device cuda --users 1,8,32,64 --saturation \
        --out results/serve_load_h200_<date>.json   # CT-sized volumes (300x512x512 int16)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from fastsam3d.bench import CT_SHAPE, environment, synthetic_ct
from fastsam3d.remote import RemoteSession
from fastsam3d.volume import Volume


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def make_cases(shape: tuple[int, int, int], variants: int, clicks: int) -> list[dict]:
    """Volumes (int16, as CT files hold them) and each one's clicks around its object."""
    cases = []
    for v in range(variants):
        vol, centre = synthetic_ct(shape, seed=v)
        vol = Volume(np.clip(np.round(vol.array), -1024, 3071).astype(np.int16), vol.ijk_to_ras)
        rng = np.random.default_rng(100 + v)
        prompts = [(centre.tolist(), True)]
        for n in range(1, clicks):
            positive = n % 3 != 2
            radius = rng.uniform(0, 15) if positive else rng.uniform(32, 45)  # object r=30 mm
            d = rng.normal(size=3)
            p = centre + radius * d / np.linalg.norm(d)
            prompts.append((p.tolist(), positive))
        cases.append({"volume": vol, "prompts": prompts})
    return cases


def references(cases: list[dict], device: str, options: dict) -> None:
    """Each case's expected results, from a local session on the same device."""
    from fastsam3d.fastpath import Runner
    from fastsam3d.session import Session
    from fastsam3d.testing import fixture_model

    runner = Runner(fixture_model(options.pop("model")), device)
    for case in cases:
        s = Session(runner, warmup=False, **options)
        s.set_volume(case["volume"])
        case["expected"] = [s.add_point(p, positive=pos) for p, pos in case["prompts"]]
        case["expected"].append(s.undo())


def same(a: object, b: object) -> bool:
    return a.region == b.region and a.shape == b.shape and np.array_equal(a.mask, b.mask)


def dice(a: object, b: object) -> float:
    x, y = a.full_mask(), b.full_mask()
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2 * (x & y).sum() / total)


def quantiles(ms: list[float]) -> dict:
    if not ms:
        return {}
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def run_level(
    url: str, n_users: int, cases: list[dict], think_ms: float, options: dict, deadline: float
) -> dict:
    barrier = threading.Barrier(n_users + 1)
    lock = threading.Lock()
    clicks: list[float] = []
    first: list[float] = []
    undos: list[float] = []
    uploads: list[float] = []
    errors: list[str] = []
    mismatches: list[dict] = []
    ends: list[float] = []
    server: dict[str, list[float]] = {"wait": [], "infer": [], "encode": []}
    timeout = max(5.0, deadline - time.monotonic())

    def user(u: int) -> None:
        case = cases[u % len(cases)]
        rnd = random.Random(u)
        try:
            with RemoteSession(url, timeout=timeout, **options) as s:
                t0 = time.perf_counter()
                s.set_volume(case["volume"])
                with lock:
                    uploads.append(time.perf_counter() - t0)
                barrier.wait(timeout)
                ops = [
                    (lambda p=p, pos=pos: s.add_point(p, positive=pos))
                    for p, pos in case["prompts"]
                ] + [s.undo]
                for k, (op, want) in enumerate(zip(ops, case["expected"])):
                    if think_ms:
                        time.sleep(rnd.uniform(0.5, 1.5) * think_ms / 1e3)
                    t = time.perf_counter()
                    got = op()
                    ms = (time.perf_counter() - t) * 1e3
                    with lock:
                        (undos if k == len(ops) - 1 else first if k == 0 else clicks).append(ms)
                        for key, v in s.last_timing.items():
                            server.setdefault(key, []).append(v)
                        if not same(got, want):
                            mismatches.append({"user": u, "step": k, "dice": dice(got, want)})
                with lock:
                    ends.append(time.perf_counter())
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"user {u}: {type(e).__name__}: {e}"[:300])
            barrier.abort()

    samples: list[dict] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            try:
                samples.append(get_json(url + "/v1/stats"))
            except OSError:
                pass
            stop.wait(0.25)

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(n_users)]
    poll = threading.Thread(target=sampler, daemon=True)
    t_start = time.perf_counter()
    poll.start()
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout)
    except threading.BrokenBarrierError:
        pass
    t_clicks = time.perf_counter()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    poll.join(5)
    ops_done = len(clicks) + len(first) + len(undos)
    span = (max(ends) - t_clicks) if ends else float("nan")
    peak = {
        k: max((s.get(k) or 0) for s in samples) if samples else None
        for k in ("rss_mb", "cuda_allocated_mb", "cuda_reserved_mb", "queued", "sessions")
    }
    busy = (samples[-1]["busy_s"] - samples[0]["busy_s"]) if len(samples) > 1 else None
    return {
        "users": n_users,
        "think_ms": think_ms,
        "clicks": quantiles(clicks + first),
        "further_clicks": quantiles(clicks),
        "first_clicks": quantiles(first),
        "undo": quantiles(undos),
        "server_timing": {k: quantiles(v) for k, v in server.items()},
        "upload_s": {
            "p50": round(float(np.median(uploads)), 3) if uploads else None,
            "max": round(max(uploads), 3) if uploads else None,
        },
        "ops": ops_done,
        "click_phase_s": round(span, 3),
        "throughput_ops_per_s": round(ops_done / span, 1) if ends else None,
        "server_busy_s": None if busy is None else round(busy, 3),
        "checked": ops_done,
        "mismatches": len(mismatches),
        "min_dice_of_mismatches": min((m["dice"] for m in mismatches), default=None),
        "errors": errors[:5],
        "error_count": len(errors),
        "server_peak": peak,
        "level_s": round(time.perf_counter() - t_start, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="fastsam3d")
    ap.add_argument("--shape", default=",".join(map(str, CT_SHAPE)), help="K,J,I voxels")
    ap.add_argument("--users", default="1,8,32,64")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--variants", type=int, default=2, help="different volumes/click sets")
    ap.add_argument(
        "--think-ms",
        type=float,
        default=500.0,
        help="mean pause before each click (uniform 0.5x..1.5x); 0 = closed loop",
    )
    ap.add_argument(
        "--saturation",
        action="store_true",
        help="also run the largest N closed-loop (think time 0)",
    )
    ap.add_argument(
        "--no-propagate",
        action="store_true",
        help="one crop per object (bounds the fixture network's large masks)",
    )
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t_begin = time.monotonic()
    deadline = t_begin + args.time_limit
    shape = tuple(int(x) for x in args.shape.split(","))
    users = [int(x) for x in args.users.split(",")]
    options = {"propagate": not args.no_propagate}

    import torch

    device = torch.device(args.device)
    env = environment(device)
    env["load_average_before"] = os.getloadavg()
    env["cpu_count"] = os.cpu_count()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    raw_mb = int(np.prod(shape)) * 2 / 2**20
    log_path = Path(args.out).with_suffix(".server.log")
    cmd = [
        sys.executable,
        "-m",
        "fastsam3d.cli",
        "serve",
        "--fixture-weights",
        "--model",
        args.model,
        "--device",
        args.device,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-sessions",
        str(max(users) + 4),
        "--max-upload-mb",
        str(int(raw_mb) + 8),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(
        cmd,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    levels = []
    try:  # the server warms up while the volumes and the local references are made
        t0 = time.perf_counter()
        cases = make_cases(shape, args.variants, args.clicks)
        references(cases, args.device, {"model": args.model, **options})
        prep_s = time.perf_counter() - t0
        print(f"volumes + local references: {prep_s:.1f} s", flush=True)
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited ({server.returncode}); see {log_path}")
            try:
                if get_json(url + "/readyz").get("status") == "ready":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready before the time limit")
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        print(f"server ready {ready_s:.1f} s after its start", flush=True)
        plan = [(n, args.think_ms) for n in users]
        if args.saturation:
            plan.append((max(users), 0.0))
        for n, think in plan:
            if time.monotonic() > deadline - 5:
                print(f"time limit: skipping N={n}", flush=True)
                continue
            r = run_level(url, n, cases, think, options, deadline)
            levels.append(r)
            c = r["clicks"]
            print(
                f"N={n:3d} think={think:.0f}ms: clicks p50 {c.get('p50_ms')} p95 "
                f"{c.get('p95_ms')} p99 {c.get('p99_ms')} ms, {r['throughput_ops_per_s']} "
                f"ops/s, upload p50 {r['upload_s']['p50']} s, mismatches "
                f"{r['mismatches']}/{r['checked']}, errors {r['error_count']}, server peak "
                f"{r['server_peak']}",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    env["load_average_after"] = os.getloadavg()
    out = {
        "benchmark": "serve_load",
        "env": env,
        "config": {
            "shape_kji": shape,
            "dtype": "int16",
            "model": args.model,
            "weights": "fixture",
            "clicks": args.clicks,
            "variants": args.variants,
            "think_ms": args.think_ms,
            "options": options,
            "protocol": "each user: create session, upload volume; barrier; "
            f"{args.clicks} clicks + 1 undo, each after a think time "
            "uniform in [0.5, 1.5] x think_ms; client-side round trip",
        },
        "prep_s": round(prep_s, 1),
        "server_ready_s": round(ready_s, 1),
        "server_exit_code": server.returncode,
        "levels": levels,
        "total_s": round(time.monotonic() - t_begin, 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["mismatches"] == 0 and r["error_count"] == 0 for r in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
