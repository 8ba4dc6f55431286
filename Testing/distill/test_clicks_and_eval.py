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
    recs = [
        {"structure": 1, "dice": [0.5, 0.9, 0.7, 0.6, 0.8] + [0.8] * 5},
        {"structure": 2, "dice": [0.1, 0.2, 0.3, 0.4, 0.5] + [0.5] * 5},
    ]
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
    rep = json.loads(path.read_text(encoding="utf-8"))
    assert set(rep) == {"crop", "original"}
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 1000


def test_released_random_click_is_uniform_over_fn_and_fp_and_labelled_by_membership():
    from fastsam3d_distill.clicks import random_error_click

    gt = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    gt[0, :3] = True
    logits = torch.full((1, 1, 6, 6, 6), -5.0)
    logits[0, 0, 2:4] = 5.0  # predicted slabs 2..3: slab 2 correct, slab 3 a false positive
    # released quirk: the previous prediction is logits > 0.5, not > 0
    logits[0, 0, 0] = 0.3  # slab 0 therefore counts as missed (false negative)
    seen = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        c, lab = random_error_click(gt, logits, [g])
        seen[int(c[0, 0])] = int(lab[0])
    # errors: slabs 0, 1 (FN, positive) and 3 (FP, negative); never slab 2, 4 or 5
    assert seen == {0: 1, 1: 1, 3: 0}
    # nothing predicted yet: a uniform voxel of the object, positive
    c, lab = random_error_click(gt, None, [g])
    assert int(c[0, 0]) < 3 and int(lab[0]) == 1
    # no error left: the previous click is repeated
    perfect = torch.where(gt[:, None], 5.0, -5.0)
    prev = (torch.tensor([[1, 2, 3]]), torch.tensor([1]))
    c, lab = random_error_click(gt, perfect, [g], prev)
    assert c.tolist() == [[1, 2, 3]] and lab.tolist() == [1]


def test_ritm_click_picks_the_deeper_error_type():
    from fastsam3d_distill.clicks import ritm_click

    gt = _ball((24, 24, 24), (12, 12, 12), 8)
    pred = _ball((24, 24, 24), (12, 12, 12), 3)  # a big false-negative shell
    rng = np.random.default_rng(0)
    p, lab = ritm_click(gt, pred, rng)
    assert lab == 1 and gt[tuple(p)] and not pred[tuple(p)]
    assert ritm_click(gt, gt, rng) is None


def test_released_stage2_matches_the_released_interaction(crops):
    """11 rounds summed, logits fed back with gradient, mask-only rounds; DiceCE per sample
    equals MONAI's DiceCELoss(sigmoid, squared_pred)."""
    from monai.losses import DiceCELoss

    from fastsam3d_distill.stage2 import FinetuneTask, dice_ce

    x = torch.randn(3, 1, 8, 8, 8)
    y = (torch.rand(3, 1, 8, 8, 8) > 0.5).float()
    ref = torch.stack(
        [DiceCELoss(sigmoid=True, squared_pred=True)(x[i : i + 1], y[i : i + 1]) for i in range(3)]
    )
    assert torch.allclose(dice_ce(x, y), ref, atol=1e-6)

    torch.manual_seed(0)
    model = fastsam3d.build_model("fastsam3d", **TINY_STUDENT)
    images, labels = crops
    batch = {"image": images[:2], "label": labels[:2], "id": [0, 1]}
    task = FinetuneTask(model, n_clicks=3, clicks="released")
    batch = task.prepare(batch)
    calls = []
    real = task.prompt_encoder.forward

    def spy(points=None, boxes=None, masks=None):
        calls.append(points is None)
        return real(points=points, boxes=boxes, masks=masks)

    task.prompt_encoder.forward = spy
    loss = task(batch)
    # the last of 3 rounds is mask-only (the random one falls in [2, 8], i.e. also round 2)
    assert calls == [False, False, True]
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert task.lr_factor(0, 59) == 1.0 and task.lr_factor(0, 60) == pytest.approx(0.1)
    assert task.lr_factor(0, 95) == pytest.approx(0.01)
    # same batch split differently: per-sample seeding gives the same per-sample losses
    one = task({k: (v[1:] if k != "id" else v[1:]) for k, v in batch.items()})
    assert torch.allclose(one, loss[1:], atol=1e-5)
    # the random mask-only round: once per step (one decoder pass a round) or per sample
    # (per sample, these two samples' rounds differ: two split rounds, one pass extra each)
    for draw, passes, mask_alone in (("batch", 11, 2), ("sample", 13, 3)):
        task = FinetuneTask(model, n_clicks=11, clicks="released", mask_only_draw=draw)
        task.prompt_encoder.forward = spy
        task.set_progress(0, 4)
        calls.clear()
        task(batch)
        assert (len(calls), sum(calls)) == (passes, mask_alone)


def test_grid_check_names_the_case_before_any_work(tmp_path):
    """Review M7: evaluation scored a label on a shifted grid without a word."""
    import nibabel as nib

    from fastsam3d_distill.data import check_grids

    root = write_nnunet_dataset(tmp_path / "ds", n_cases=2, shape=(24, 26, 28))
    cases = discover(root)
    check_grids(cases)  # consistent: fine
    lab = nib.load(cases[1].label)
    aff = lab.affine.copy()
    aff[0, 3] += 10.0
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), aff), cases[1].label)
    with pytest.raises(ValueError, match="case_001: label affine differs .* 10 mm"):
        check_grids(cases)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), lab.affine), cases[1].label)
    with pytest.raises(ValueError, match=r"case_001: label shape \(5, 5, 5\) differs"):
        check_grids(cases)


def test_released_evaluation_protocol_is_seeded(tmp_path):
    root = write_nnunet_dataset(tmp_path / "ds", n_cases=1, shape=(40, 44, 48))
    cases = discover(root)
    samples = index_samples(cases, min_voxels=200)[:1]
    torch.manual_seed(0)
    model = fastsam3d.build_model("fastsam3d", **TINY_STUDENT)
    ds = CropDataset(cases, samples)
    a = evaluate_crops(model, ds, n_clicks=3, protocol="released", seed=1)
    b = evaluate_crops(model, ds, n_clicks=3, protocol="released", seed=1)
    assert a == b
