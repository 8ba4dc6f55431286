"""Stage-1 specifics: the paper's block pairing, teacher initialisation, the progressive
schedule, the released-code variant, and the teacher-feature cache."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import TINY_STUDENT, TINY_TEACHER

import fastsam3d
from fastsam3d.testing import fixture_model
from fastsam3d_distill.data import TensorCropDataset
from fastsam3d_distill.stage1 import (
    CachedFeatureDataset,
    DistillTask,
    cache_teacher_features,
    init_student_from_teacher,
    needed_teacher_taps,
    released_tap_pairs,
    tap_pairs,
)


def test_paper_pairs_student_block_i_with_teacher_block_2i():
    # 1-based (i, 2i) for the real 6-from-12 student, written 0-based.
    assert tap_pairs(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert released_tap_pairs(6) == [(1, 1), (3, 3), (5, 5)]
    assert needed_teacher_taps(6, 12) == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="multiple"):
        tap_pairs(4, 6)


def test_real_student_initialises_from_real_teacher_where_shapes_allow():
    teacher = fastsam3d.build_model("sam-med3d-turbo-fastsam3d-block").image_encoder
    student = fastsam3d.build_model("fastsam3d").image_encoder
    copied = set(init_student_from_teacher(student, teacher))
    t = teacher.state_dict()
    s = student.state_dict()
    assert torch.equal(s["patch_embed.proj.weight"], t["patch_embed.proj.weight"])
    assert torch.equal(s["neck.2.weight"], t["neck.2.weight"])
    # Student block 0 (attention-free) takes teacher block 1's MLP; block 3 takes block 7's qkv.
    assert torch.equal(s["blocks.0.mlp.lin1.weight"], t["blocks.1.mlp.lin1.weight"])
    assert torch.equal(s["blocks.3.attn.qkv.weight"], t["blocks.7.attn.qkv.weight"])
    # Rel-pos tables differ in head size (128 vs 64): left as initialised.
    assert "blocks.2.attn.rel_pos_d" not in copied
    assert len(copied) == len(s) - 3 * 4  # everything except 4 blocks x 3 rel-pos tables


def test_progressive_k_grows_on_schedule_and_caps():
    student = fastsam3d.build_model("fastsam3d", **TINY_STUDENT).image_encoder
    task = DistillTask(student, None, teacher_depth=4, k_every_epochs=3)
    ks = []
    for epoch in range(10):
        task.set_progress(epoch, 0)
        ks.append(task.k)
    assert ks == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    task = DistillTask(student, None, teacher_depth=4, k_every_steps=5)
    task.set_progress(0, 12)
    assert task.k == 2


def test_loss_uses_only_the_first_k_pairs(crops):
    torch.manual_seed(0)
    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER).image_encoder
    student = fastsam3d.build_model("fastsam3d", **TINY_STUDENT).image_encoder
    task = DistillTask(student, teacher, loss="paper-mse", neck_weight=0.0)
    batch = task.prepare({"image": crops[0][:1], "id": torch.tensor([0])})
    with torch.no_grad():
        neck, taps = student(batch["image"], return_taps=True)
        col = task.teacher_taps.index(1)
        want = (taps[0] - batch["t_taps"][:, col]).pow(2).mean()
        task.k = 1
        assert float(task(batch)[0]) == pytest.approx(float(want), rel=1e-5)
        task.k = 2
        assert float(task(batch)[0]) != pytest.approx(float(want), rel=1e-3)


def test_feature_cache_round_trip_matches_the_teacher(tmp_path, crops):
    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER).image_encoder
    taps = needed_teacher_taps(2, 4)
    ds = TensorCropDataset(crops[0][:3])
    cache_teacher_features(teacher, ds, tmp_path, taps, batch_size=2, bf16=False)
    cached = CachedFeatureDataset(tmp_path)
    assert len(cached) == 3 and cached.teacher_taps == taps
    item = cached[2]
    with torch.no_grad():
        neck, t = teacher(item["image"][None], return_taps=True)
    assert torch.allclose(item["t_neck"].float(), neck[0], rtol=2e-2, atol=2e-2)
    assert torch.allclose(item["t_taps"][1].float(), t[taps[1]][0], rtol=2e-2, atol=2e-2)
    # Stored crops are bf16-rounded before the teacher saw them: student input == teacher input.
    assert torch.equal(item["image"], crops[0][2].to(torch.bfloat16).float())
    mem = CachedFeatureDataset(tmp_path, preload=True, device="cpu")
    b = mem.get_batch([0, 2], epoch=0)
    assert b["t_taps"].shape == (2, len(taps), 8, 8, 8, TINY_TEACHER["embed_dim"])
    (tmp_path / "0000001.pt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 samples"):
        CachedFeatureDataset(tmp_path)


def test_paper_loss_is_the_printed_formula(crops):
    """--loss paper = (1/k) sum_i ||f_t^(2i) - f_s^(i)||: an L2 norm, k pairs, no neck term."""
    torch.manual_seed(0)
    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER).image_encoder
    student = fastsam3d.build_model("fastsam3d", **TINY_STUDENT).image_encoder
    task = DistillTask(student, teacher, loss="paper")
    batch = task.prepare({"image": crops[0][:2], "id": torch.tensor([0, 1])})
    with torch.no_grad():
        _, taps = student(batch["image"], return_taps=True)
        norms = [
            (taps[s] - batch["t_taps"][:, task.teacher_taps.index(t)]).flatten(1).norm(dim=1)
            for s, t in task.pairs
        ]
        task.k = 2
        assert torch.allclose(task(batch), (norms[0] + norms[1]) / 2, rtol=1e-5)
    # No neck term: the neck gets no gradient, so DDP must look for unused parameters.
    assert task.find_unused and not task.static_graph
    task(batch).sum().backward()
    assert student.neck[0].weight.grad is None
    ours = DistillTask(student, teacher, loss="paper-mse")
    assert ours.static_graph and not ours.find_unused


def test_cache_files_hold_only_their_sample(tmp_path, crops):
    """Review M1: each file stored a view of the whole batch's crop (4x the bytes at batch 4)."""
    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER).image_encoder
    ds = TensorCropDataset(crops[0][:4])
    cache_teacher_features(
        teacher, ds, tmp_path, needed_teacher_taps(2, 4), batch_size=4, bf16=False
    )
    rec = torch.load(tmp_path / "0000001.pt", weights_only=True)
    img = rec["image"]
    assert img.untyped_storage().nbytes() == img.numel() * img.element_size()


def test_cache_manifest_refuses_other_settings_and_teachers(tmp_path, crops):
    """Review M2: a second `cache` with other settings mixed into the same folder silently."""
    from types import SimpleNamespace

    from fastsam3d_distill.stage1 import cache_manifest, teacher_identity

    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER).image_encoder
    taps = needed_teacher_taps(2, 4)
    ds = TensorCropDataset(crops[0][:2])
    args = SimpleNamespace(
        teacher="fixture:sam-med3d-turbo-fastsam3d-block",
        teacher_override=["depth=4"],
        synthetic=2,
        seed=0,
        classes=None,
        min_voxels=100,
        lattice_anchor="centre",
    )
    man = cache_manifest(args, ds, taps, 4, bf16=False)
    cache_teacher_features(teacher, ds, tmp_path, taps, batch_size=2, bf16=False, manifest=man)
    cached = CachedFeatureDataset(tmp_path)
    cached.check_teacher(teacher_identity(args))  # same teacher: fine
    # A restart with the same settings keeps the files; other settings are refused.
    cache_teacher_features(teacher, ds, tmp_path, taps, batch_size=2, bf16=False, manifest=man)
    other = dict(man, classes=[2])
    with pytest.raises(ValueError, match="classes differ"):
        cache_teacher_features(teacher, ds, tmp_path, taps, bf16=False, manifest=other)
    args.teacher_override = ["depth=4", "embed_dim=64"]
    with pytest.raises(ValueError, match="was made by teacher"):
        cached.check_teacher(teacher_identity(args))
    # Files without a manifest (an older cache) are not reused either.
    old = tmp_path / "old"
    cache_teacher_features(teacher, ds, old, taps, batch_size=2, bf16=False)
    (old / "index.json").unlink()
    with pytest.raises(ValueError, match="without a manifest"):
        cache_teacher_features(teacher, ds, old, taps, bf16=False, manifest=man)
