"""Where the fast path's time goes on the GPU: SDPA kernel choice for the encoder graph, and a
kernel-level profile (count and summed device time) of the eager bf16 encoder and fp32 click.

    PYTHONPATH=model/src python3 model/benchmarks/fastpath_variants.py --out results/

Graph replay time minus the summed kernel time is the launch/gap overhead the graph leaves.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastsam3d.bench import _click_inputs, environment, time_fn
from fastsam3d.fastpath import Runner
from fastsam3d.testing import fixture_model

BACKENDS = {
    "default": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def kernel_profile(fn, steps: int = 5) -> dict:
    """Per-call kernel count and summed device time (ms) of ``fn``, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    total, count = 0.0, 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            per[ev.name][0] += 1
            per[ev.name][1] += t
            total += t
            count += 1
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:15]
    return {
        "kernels_per_call": count / steps,
        "kernel_ms_per_call": total / steps / 1e3,
        "top": [{"name": k[:90], "calls": v[0] / steps, "ms": v[1] / steps / 1e3} for k, v in top],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fastsam3d,sam-med3d-turbo")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dev = torch.device("cuda")
    crop = torch.randn(1, 1, 128, 128, 128, device=dev)
    out: dict = {"environment": environment(dev), "sdpa": {}, "click": {}, "profile": {}}
    names = args.models.split(",")
    for name in names:
        model = fixture_model(name, device=dev)
        for label, backends in BACKENDS.items():
            try:
                r = Runner(model, dev, "bf16")
                if backends is None:
                    r.encode(crop)
                else:
                    with sdpa_kernel(backends):
                        r.encode(crop)  # captured under this backend choice
                res = time_fn(lambda r=r: r.encode(crop), dev, args.repeats, 20)
                (key,) = r.graphs.entries
                g = r.graphs.entries[key]
                res["replay_only"] = time_fn(g.replay, dev, args.repeats, 20)
                out["sdpa"][f"{name}/{label}"] = res
                print(
                    f"{name} encoder graph, SDPA {label}: {res['median_ms']:.3f} ms "
                    f"(replay alone {res['replay_only']['median_ms']:.3f})",
                    flush=True,
                )
            except Exception as exc:  # noqa: BLE001 - a backend may not support the bias
                out["sdpa"][f"{name}/{label}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{name} SDPA {label}: {type(exc).__name__}: {str(exc)[:200]}")
        r = Runner(model, dev, "bf16", graphs=False)
        prof = kernel_profile(lambda r=r: r.encode(crop))
        out["profile"][f"encoder/{name}"] = prof
        print(
            f"{name} eager bf16 encoder: {prof['kernels_per_call']:.0f} kernels, "
            f"{prof['kernel_ms_per_call']:.3f} ms of kernel time",
            flush=True,
        )
        for row in prof["top"][:12]:
            print(f"   {row['ms']:.4f} ms  x{row['calls']:.0f}  {row['name']}")
        if name == names[0]:
            with torch.inference_mode():
                emb = r.encode(crop)
            coords, labels, mask = _click_inputs(dev)
            a = (emb, coords, labels, mask)
            ref = None
            for cp, sdpa in (
                ("fp32", "default"),
                ("fp32", "math"),
                ("tf32", "math"),
                ("bf16", "default"),
                ("bf16", "math"),
            ):
                rc = Runner(model, dev, "bf16", click_precision=cp)
                if sdpa == "math":
                    with sdpa_kernel([SDPBackend.MATH]):
                        low, _ = rc.click(*a)  # captured with the math attention
                else:
                    low, _ = rc.click(*a)
                ref = low if ref is None else ref
                cp = f"{cp}/{sdpa}"
                res = time_fn(lambda rc=rc, a=a: rc.click(*a), dev, args.repeats, 20)
                key = next(iter(rc.graphs.entries))
                res["replay_only"] = time_fn(rc.graphs.entries[key].replay, dev, args.repeats, 20)
                res["rel_err_vs_fp32"] = float((low - ref).norm() / ref.norm())
                out["click"][cp] = res
                print(
                    f"click graph {cp}: {res['median_ms']:.3f} ms (replay alone "
                    f"{res['replay_only']['median_ms']:.3f}), rel err vs fp32 "
                    f"{res['rel_err_vs_fp32']:.2e}",
                    flush=True,
                )
            re = Runner(model, dev, "bf16", graphs=False)
            prof = kernel_profile(lambda r=re, a=a: r.click(*a))
            out["profile"]["click"] = prof
            print(
                f"eager fp32 click: {prof['kernels_per_call']:.0f} kernels, "
                f"{prof['kernel_ms_per_call']:.3f} ms of kernel time",
                flush=True,
            )
            for row in prof["top"][:12]:
                print(f"   {row['ms']:.4f} ms  x{row['calls']:.0f}  {row['name']}")
        del model
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fastpath_variants.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
