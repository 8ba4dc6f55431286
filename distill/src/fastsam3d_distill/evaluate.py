"""Click-simulation evaluation on held-out cases, reported both ways the field does.

Two grids:

* ``crop``: on the 128³ training crop (encoder once, the decoder per click, Dice of the
  upsampled logits > 0 against the crop's target), as FastSAM3D's ``validation_student.py``;
* ``original``: what a user gets, through ``fastsam3d.Session`` on the original volume (the
  session picks and moves crops itself and pastes back); clicks are simulated on the original
  grid and sent as RAS points.

Two reductions per click budget k: ``final`` = Dice after click k (what a user is left with),
``best`` = the maximum over clicks 1..k (FastSAM3D's ``max(dice_list)``, optimistic).

Two click protocols: ``released`` (default) = FastSAM3D's evaluation: clicks 1-2 by the RITM
rule, later clicks uniform random error voxels, the previous prediction being the upsampled
logits > 0.5, seeded per sample (``seed``), only the newest click sent; ``ours`` = the first
click at the object's most interior voxel, then the centre of the largest error component
(deterministic, and more favourable: do not compare it with the paper's numbers).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .clicks import RELEASED_THRESHOLD, dice, first_click, next_click, ritm_click
from .data import Case, CropDataset, Sample, load_array
from .stage2 import decode, prompts_for

BUDGETS = (1, 3, 5, 10)


def _released_click(
    gt: np.ndarray, logits: np.ndarray | None, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, int] | None:
    """Click k (0-based) of the released evaluation: RITM for the first two, then a uniform
    random voxel of FN ∪ FP; the previous prediction is the upsampled logits > 0.5."""
    pred = np.zeros_like(gt) if logits is None else logits > RELEASED_THRESHOLD
    if k < 2:
        return ritm_click(gt, pred, rng)
    fn = gt & ~pred
    err = np.argwhere(fn | (pred & ~gt))
    if not len(err):
        return None
    p = err[int(rng.integers(len(err)))]
    return p, int(fn[tuple(p)])


def _click_for(
    protocol: str,
    gt: np.ndarray,
    pred: np.ndarray | None,
    logits: np.ndarray | None,
    k: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int] | None:
    if protocol == "released":
        return _released_click(gt, logits, k, rng)
    if k == 0:
        return first_click(gt), 1
    assert pred is not None
    return next_click(gt, pred)


@torch.no_grad()
def evaluate_crops(
    model: nn.Module,
    dataset: CropDataset,
    n_clicks: int = 10,
    device: str | torch.device = "cpu",
    policy: str | None = None,
    protocol: str = "released",
    seed: int = 2023,
) -> list[dict[str, Any]]:
    """Per-sample Dice after each click on the 128³ crop (``protocol``: module docstring)."""
    from fastsam3d.geometry import upsample_logits

    model = model.to(device).eval()
    policy = policy or getattr(getattr(model, "config", None), "point_policy", "newest")
    parts = (model.prompt_encoder, model.mask_decoder)
    records = []
    for i in range(len(dataset)):
        item = dataset.get(i, 0)
        gt = item["label"][0].numpy() > 0.5
        rng = np.random.default_rng([seed, i])
        emb = model.image_encoder(item["image"][None].to(device))
        first = _click_for(protocol, gt, None, None, 0, rng)
        assert first is not None  # samples are non-empty structures
        history = [[first]]
        prev = torch.zeros(1, 1, 32, 32, 32, device=device)
        scores = []
        for c in range(n_clicks):
            coords, labels = prompts_for(history, policy, torch.device(device))
            low = decode(parts, emb, coords, labels, prev)
            up = upsample_logits(low).float().cpu().numpy().reshape(gt.shape)
            pred = up > 0
            scores.append(dice(pred, gt))
            if c + 1 < n_clicks:
                nxt = _click_for(protocol, gt, pred, up, c + 1, rng)
                history[0].append(nxt if nxt is not None else history[0][-1])
                prev = low
        s = dataset.samples[i]
        records.append(
            {"sample": i, "case": dataset.cases[s.case].name, "structure": s.value, "dice": scores}
        )
    return records


def evaluate_volumes(
    model: nn.Module,
    cases: list[Case],
    samples: list[Sample],
    n_clicks: int = 10,
    device: str | torch.device = "cpu",
    lattice_anchor: str = "centre",
    protocol: str = "released",
    seed: int = 2023,
) -> list[dict[str, Any]]:
    """Per-sample Dice after each click on the original grid, through ``fastsam3d.Session``.

    The released protocol's clicks need the previous logits; the session gives its mask, so
    on this grid the "logits > 0.5" of the released rule is the session's mask."""
    import fastsam3d

    kw = {} if lattice_anchor == "centre" else {"lattice_anchor": lattice_anchor}
    session = fastsam3d.Session(model, device=device, warmup=False, **kw)
    records = []
    by_case: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_case[s.case].append(i)
    for ci, idxs in by_case.items():
        img, aff = load_array(cases[ci].image)
        lab, lab_aff = load_array(cases[ci].label)
        if lab.shape != img.shape or not np.allclose(lab_aff, aff, atol=1e-3):
            raise ValueError(f"case {cases[ci].name}: label grid differs from the image grid")
        lab = np.rint(lab).astype(np.int64)
        session.set_volume(fastsam3d.Volume(img.astype(np.float32), aff))
        for i in idxs:
            gt = lab == samples[i].value
            session.reset()
            rng = np.random.default_rng([seed, i])
            first = _click_for(protocol, gt, None, None, 0, rng)
            assert first is not None
            point, positive = first[0], bool(first[1])
            scores = []
            for c in range(n_clicks):
                ijk = np.asarray(point, dtype=np.float64)[::-1]  # [k,j,i] -> (i,j,k)
                ras = aff[:3, :3] @ ijk + aff[:3, 3]
                pred = session.add_point(ras, positive=positive).full_mask()
                scores.append(dice(pred, gt))
                if c + 1 < n_clicks:
                    nxt = _click_for(protocol, gt, pred, pred.astype(np.float32), c + 1, rng)
                    if nxt is not None:
                        point, positive = nxt[0], bool(nxt[1])
            records.append(
                {"sample": i, "case": cases[ci].name, "structure": samples[i].value, "dice": scores}
            )
    return records


def summarise(records: list[dict[str, Any]], budgets: tuple[int, ...] = BUDGETS) -> dict[str, Any]:
    """Mean Dice per click budget, final and best-over-clicks, overall and per structure."""
    n = min(len(r["dice"]) for r in records)
    budgets = tuple(b for b in budgets if b <= n)

    def reduce(rs: list[dict[str, Any]]) -> dict[str, Any]:
        d = np.array([r["dice"][:n] for r in rs])
        return {
            "n": len(rs),
            "final": {str(k): float(d[:, k - 1].mean()) for k in budgets},
            "best": {str(k): float(d[:, :k].max(1).mean()) for k in budgets},
            "curve": d.mean(0).tolist(),
        }

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[str(r["structure"])].append(r)
    return {
        "overall": reduce(records),
        "per_structure": {k: reduce(v) for k, v in sorted(groups.items())},
    }


def write_report(results: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> Path:
    """``evaluation.json`` (summaries + per-sample Dice) and ``evaluation.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        grid: {"summary": summarise(recs), "samples": recs}
        for grid, recs in results.items()
        if recs
    }
    path = out / "evaluation.json"
    path.write_text(json.dumps(report, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for grid, rep in report.items():
        d = np.array([r["dice"] for r in rep["samples"]])
        x = np.arange(1, d.shape[1] + 1)
        ax.plot(x, d.mean(0), marker="o", label=f"{grid}: Dice after click k")
        ax.plot(
            x,
            np.maximum.accumulate(d, axis=1).mean(0),
            ls="--",
            label=f"{grid}: best over clicks 1..k",
        )
    ax.set_xlabel("clicks")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "evaluation.png", dpi=120)
    plt.close(fig)
    return path
