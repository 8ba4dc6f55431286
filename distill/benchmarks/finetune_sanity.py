"""Sanity check of stage 2 on synthetic data: does click-simulated fine-tuning of the prompt
encoder + decoder raise held-out Dice? (Tiny model, CPU-sized; the encoder stays frozen at its
random initialisation, so this measures what the decoder learns from clicks and mask feedback.)

    python distill/benchmarks/finetune_sanity.py --out /tmp/sanity --steps 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
for sub in ("model/src", "distill/src"):
    if str(HERE.parents[2] / sub) not in sys.path:
        sys.path.insert(0, str(HERE.parents[2] / sub))

import torch  # noqa: E402

import fastsam3d  # noqa: E402
from fastsam3d_distill.data import CropDataset, discover, index_samples  # noqa: E402
from fastsam3d_distill.engine import TrainConfig, Trainer  # noqa: E402
from fastsam3d_distill.evaluate import (  # noqa: E402
    evaluate_crops,
    evaluate_volumes,
    summarise,
    write_report,
)
from fastsam3d_distill.stage2 import FinetuneTask  # noqa: E402
from fastsam3d_distill.synthetic import write_nnunet_dataset  # noqa: E402

TINY = dict(depth=2, embed_dim=32, num_heads=2, num_attn_free_blocks=1, out_chans=48)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    out = Path(a.out)
    train = write_nnunet_dataset(out / "train", n_cases=12, shape=(64, 64, 64), seed=0)
    held = write_nnunet_dataset(out / "heldout", n_cases=3, shape=(64, 64, 64), seed=100)
    tr_cases, ho_cases = discover(train), discover(held)
    tr = CropDataset(tr_cases, index_samples(tr_cases, min_voxels=200), augment=True)
    ho = CropDataset(ho_cases, index_samples(ho_cases, min_voxels=200))
    torch.manual_seed(2023)
    model = fastsam3d.build_model("fastsam3d", **TINY)
    before = evaluate_crops(model, ho, n_clicks=5, device=a.device)
    model.train()
    task = FinetuneTask(model, n_clicks=a.clicks)
    cfg = TrainConfig(
        out_dir=str(out / "run"),
        epochs=10**6,
        max_steps=a.steps,
        batch_size=2,
        lr=1e-3,
        device=a.device,
        resume=False,
        progress=False,
        log_every=5,
        checkpoints=False,
    )
    t0 = time.perf_counter()
    res = Trainer(task, tr, cfg).fit()
    after = evaluate_crops(model.eval(), ho, n_clicks=5, device=a.device)
    after_orig = evaluate_volumes(model, ho_cases, ho.samples, n_clicks=5, device=a.device)
    write_report({"crop": after, "original": after_orig}, out / "eval_after")
    report = {
        "steps": res["opt_steps"],
        "train_samples": len(tr),
        "heldout_samples": len(ho),
        "train_seconds": time.perf_counter() - t0,
        "before": summarise(before)["overall"],
        "after": summarise(after)["overall"],
        "after_original_grid": summarise(after_orig)["overall"],
    }
    (out / "finetune_sanity.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("steps", "train_seconds")}))
    print(
        "before",
        report["before"]["final"],
        "after",
        report["after"]["final"],
        "after (original grid)",
        report["after_original_grid"]["final"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
