"""Simulated clicks, Dice reductions, and the evaluation on crop and original grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distill_helpers import TINY_STUDENT

import fastsam3d
from fastsam3d_distill.clicks import dice, first_click, next_click
from fastsam3d_distill.data import CropDataset, discover, index_samples
from fastsam3d_distill.evaluate import (
    evaluate_crops,
    evaluate_volumes,
    summarise,
    write_report,
)
from fastsam3d_distill.synthetic import write_nnunet_dataset


def _ball(shape, centre, r):
    g = np.indices(shape).transpose(1, 2, 3, 0)
    return ((g - np.asarray(centre)) ** 2).sum(-1) <= r * r


def test_first_click_is_the_most_interior_voxel():
    gt = _ball((20, 20, 20), (10, 9, 8), 5)
    assert tuple(first_click(gt)) == (10, 9, 8)
    g = torch.Generator().manual_seed(0)
    assert all(gt[tuple(first_click(gt, g))] for _ in range(20))


def test_next_click_targets_the_largest_error_with_the_right_sign():
    gt = _ball((32, 32, 32), (16, 16, 16), 8)
    pred = gt.copy()
    pred[_ball(gt.shape, (16, 16, 16), 4)] = False  # big hole: false negatives
    pred[_ball(gt.shape, (3, 3, 3), 2)] = True  # small blob: false positives
    p, label = next_click(gt, pred)
    assert label == 1 and np.linalg.norm(p - 16) <= 1
    pred2 = gt | _ball(gt.shape, (4, 4, 27), 4)
    p, label = next_click(gt, pred2)
    assert label == 0 and not gt[tuple(p)] and pred2[tuple(p)]
    assert next_click(gt, gt) is None


def test_dice_edge_cases():
    a = np.zeros((4, 4, 4), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[0, 0, 0] = True
    assert dice(b, a) == 0.0 and dice(b, b) == 1.0


def test_summary_reports_final_and_best_over_clicks():
    recs = [{"structure": 1, "dice": [0.5, 0.9, 0.7, 0.6, 0.8] + [0.8] * 5},
            {"structure": 2, "dice": [0.1, 0.2, 0.3, 0.4, 0.5] + [0.5] * 5}]
    s = summarise(recs)
    assert s["overall"]["final"]["1"] == pytest.approx(0.3)
    assert s["overall"]["final"]["3"] == pytest.approx(0.5)
    assert s["overall"]["best"]["3"] == pytest.approx(0.6)
    assert s["per_structure"]["1"]["best"]["5"] == pytest.approx(0.9)
    assert s["per_structure"]["1"]["final"]["5"] == pytest.approx(0.8)
    assert set(s["overall"]["final"]) == {"1", "3", "5", "10"}


def test_evaluation_runs_on_crop_and_original_grid(tmp_path):
    root = write_nnunet_dataset(tmp_path / "ds", n_cases=1, shape=(40, 44, 48), oblique_deg=10)
    cases = discover(root)
    samples = index_samples(cases, min_voxels=200)[:1]
    torch.manual_seed(0)
    model = fastsam3d.build_model("fastsam3d", **TINY_STUDENT)
    results = {
        "crop": evaluate_crops(model, CropDataset(cases, samples), n_clicks=3),
        "original": evaluate_volumes(model, cases, samples, n_clicks=3),
    }
    for recs in results.values():
        assert len(recs) == 1 and len(recs[0]["dice"]) == 3
        assert all(0.0 <= d <= 1.0 for d in recs[0]["dice"])
    path = write_report(results, tmp_path / "eval")
    rep = json.loads(path.read_text())
    assert set(rep) == {"crop", "original"}
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 1000
