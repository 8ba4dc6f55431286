"""The "fold" attention backend on the GPU: encoder latency against "sdpa" (fast path: bf16
weights + CUDA graph) and accuracy against the parity fixture.

Usage (CUDA machine): PYTHONPATH=model/src python3 model/benchmarks/fold_check.py \
    --parity .parity/parity.npz --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fastsam3d import set_attention_backend
from fastsam3d.bench import environment, time_fn
from fastsam3d.fastpath import Runner
from fastsam3d.testing import fixture_model

GOLDEN = {"fastsam3d": "fastsam3d", "sam-med3d-turbo": "sammed3d"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parity", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    golden = np.load(args.parity)
    x = torch.from_numpy(golden["input"]).to(dev)
    out: dict = {"environment": environment(dev), "models": {}}
    for name, key in GOLDEN.items():
        ref = golden[f"{key}_embedding"]
        res = {}
        for backend in ("sdpa", "fold"):
            model = fixture_model(name, device=dev)
            set_attention_backend(model, backend)
            exact = Runner(model, dev, precision="fp32", graphs=False)
            fast = Runner(model, dev)
            fast.warmup()
            e32, e16 = exact.encode(x).cpu().numpy(), fast.encode(x).cpu().numpy()
            res[backend] = {
                "fast": time_fn(lambda r=fast: r.encode(x), dev, args.repeats, 10),
                "exact_rel_err_vs_golden": float(np.linalg.norm(e32 - ref) / np.linalg.norm(ref)),
                "fast_rel_err_vs_golden": float(np.linalg.norm(e16 - ref) / np.linalg.norm(ref)),
            }
            print(
                f"{name:16s} {backend:5s} fast encoder {res[backend]['fast']['median_ms']:.3f} ms"
                f"  exact err {res[backend]['exact_rel_err_vs_golden']:.2e}"
                f"  fast err {res[backend]['fast_rel_err_vs_golden']:.2e}",
                flush=True,
            )
        out["models"][name] = res
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fold_check.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
