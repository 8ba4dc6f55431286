"""Small CPU measurements behind the recipe table and the gating advice (issue 12).

Tiny networks (teacher depth 4 / width 32, student depth 2), 128³ synthetic crops, fp32, one
thread: the *direction* of each effect, not its size at full scale.

1. stage 1, recipe variants: the student's feature error to the teacher (neck MSE and the
   mean block-pair MSE) on held-out crops after a fixed number of steps;
2. backward gating, time to equal loss: off / per-sample / per-micro-batch, on a stage-1 run
   with cached teacher targets (fixed objective) and on stage 2 (released clicks).

    python distill/benchmarks/cpu_recipes.py --out distill/benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
for sub in ("model/src", "distill/src"):
    p = str(HERE.parents[2] / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import fastsam3d  # noqa: E402
from fastsam3d.bench import git_commit  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402
from fastsam3d_distill.data import TensorCropDataset  # noqa: E402
from fastsam3d_distill.engine import TrainConfig, Trainer  # noqa: E402
from fastsam3d_distill.stage1 import (  # noqa: E402
    DistillTask,
    init_student_from_teacher,
    needed_teacher_taps,
)
from fastsam3d_distill.stage2 import FinetuneTask  # noqa: E402
from fastsam3d_distill.synthetic import synthetic_crops  # noqa: E402

T = dict(depth=4, embed_dim=32, num_heads=2, window_size=0, global_attn_indexes=(), out_chans=48)
S = dict(depth=2, embed_dim=32, num_heads=2, num_attn_free_blocks=1, out_chans=48)


def _cfg(**kw: object) -> TrainConfig:
    base = dict(
        out_dir=tempfile.mkdtemp(prefix="cpu_recipes_"),
        precision="fp32",
        device="cpu",
        resume=False,
        tensorboard=False,
        progress=False,
        log_every=1,
        checkpoints=False,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@torch.no_grad()
def feature_error(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> dict:
    task = DistillTask(student, teacher, loss="paper-mse", neck_weight=0.0)
    task.k = len(task.pairs)
    b = task.prepare({"image": x})
    neck, _ = student(x, return_taps=True)
    return {
        "neck_mse": float((neck - b["t_neck"]).pow(2).mean()),
        "pairs_mse": float(task(b).mean()),
    }


def stage1_variants(
    teacher: torch.nn.Module, train: torch.Tensor, held: torch.Tensor, steps: int
) -> dict:
    variants = {
        "released (neck, random init, no clip)": ("neck", 0.0, "random", 0.0),
        "paper (norm, k pairs, random init, no clip)": ("paper", 0.0, "random", 0.0),
        "+ MSE and neck term (paper-mse)": ("paper-mse", 1.0, "random", 0.0),
        "+ teacher init": ("paper-mse", 1.0, "teacher", 0.0),
        "+ grad clip 1.0 (= ours)": ("paper-mse", 1.0, "teacher", 1.0),
    }
    out = {}
    for name, (loss, neck_w, init, clip) in variants.items():
        torch.manual_seed(0)
        student = fastsam3d.build_model("fastsam3d", **S).image_encoder.train()
        if init == "teacher":
            init_student_from_teacher(student, teacher)
        task = DistillTask(student, teacher, loss=loss, neck_weight=neck_w, k_every_steps=10)
        t0 = time.perf_counter()
        Trainer(
            task,
            TensorCropDataset(train),
            _cfg(epochs=10**6, max_steps=steps, batch_size=2, grad_clip=clip),
        ).fit()
        out[name] = {
            **feature_error(student.eval(), teacher, held),
            "seconds": time.perf_counter() - t0,
        }
        print(f"[stage1] {name}: {out[name]}", flush=True)
    return out


def smoothed(xs: list[float], w: int) -> list[float]:
    return [
        sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1])
        for i in range(len(xs))
    ]


def gating(make_task, dataset, steps: int, batch: int, window: int) -> dict:
    """Ungated vs per-sample vs per-batch gate: when does each reach the ungated run's best
    smoothed loss (over its last half), in wall time and in samples seen?"""
    runs = {}
    for mode in ("off", "sample", "batch"):
        torch.manual_seed(0)
        task = make_task()
        cfg = _cfg(
            epochs=10**6,
            max_micro_steps=steps,
            batch_size=batch,
            lr=1e-3,
            gate=mode != "off",
            gate_mode=mode if mode != "off" else "sample",
            gate_warmup=max(2 * (len(dataset) // batch), steps // 5),
        )
        tr = Trainer(task, dataset, cfg)
        res = tr.fit()
        h = tr.history
        runs[mode] = {
            "t": [r["time"] for r in h],
            "loss": smoothed([r["loss"] for r in h], window),
            "gate": res["gate"],
            "seconds": res["seconds"],
        }
    target = min(runs["off"]["loss"][len(runs["off"]["loss"]) // 2 :])
    out: dict = {"target_loss": target}
    for mode, r in runs.items():
        hit = next((t for t, v in zip(r["t"], r["loss"]) if v <= target), None)
        out[mode] = {
            "seconds_to_target": hit,
            "run_seconds": r["seconds"],
            "final_smoothed_loss": r["loss"][-1],
            **r["gate"],
        }
    base = out["off"]["seconds_to_target"]
    for mode in ("sample", "batch"):
        hit = out[mode]["seconds_to_target"]
        out[mode]["time_saved"] = None if hit is None or not base else 1 - hit / base
    print(f"[gating] {json.dumps(out)}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage1-steps", type=int, default=30)
    ap.add_argument("--gate-steps", type=int, default=160)
    ap.add_argument("--ft-steps", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **T).image_encoder.eval()
    teacher.requires_grad_(False)
    images, labels = synthetic_crops(10, seed=0)
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "machine": "shared 2-core CPU VM, 1 thread",
        "scale": "tiny networks "
        "(teacher 4x32, student 2x32), 8 training + 2 held-out 128^3 crops, fp32",
    }
    result["stage1"] = stage1_variants(teacher, images[:8], images[8:], args.stage1_steps)

    # Gating, stage 1 with cached targets (the teacher's outputs precomputed, fixed k).
    with torch.no_grad():
        neck, taps = teacher(images[:8], return_taps=True)

    class Cached(TensorCropDataset):
        def __init__(self, x: torch.Tensor) -> None:
            super().__init__(x)
            self.direct_batches = True  # batches straight from memory, targets included

        def get_batch(self, idx: list[int], epoch: int) -> dict:
            i = torch.as_tensor(idx)
            tap_ids = needed_teacher_taps(2, 4)
            return {
                "image": images[i],
                "id": list(idx),
                "t_neck": neck[i],
                "t_taps": torch.stack([taps[t][i] for t in tap_ids], 1),
            }

    def s1_task() -> DistillTask:
        st = fastsam3d.build_model("fastsam3d", **S).image_encoder.train()
        return DistillTask(st, None, loss="paper-mse", k_start=2, teacher_depth=4)

    result["gating_stage1_cached"] = gating(s1_task, Cached(images[:8]), args.gate_steps, 2, 8)

    def s2_task() -> FinetuneTask:
        m = fastsam3d.build_model("fastsam3d", **S)
        return FinetuneTask(m, n_clicks=3, clicks="released")

    result["gating_stage2"] = gating(
        s2_task, TensorCropDataset(images[:8], labels[:8]), args.ft_steps, 2, 8
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_recipes.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'cpu_recipes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
