"""SkipGS-style backward gating: warm-up, skipping, the minimum backward share, resume."""

from __future__ import annotations

import math

import pytest

from fastsam3d_distill.gating import BackwardGate


def _decreasing_stream(gate: BackwardGate, n: int, ids: int = 4) -> list[bool]:
    """A training-like stream: each sample's loss falls slowly with small noise."""
    out = []
    for t in range(n):
        i = t % ids
        loss = 1.0 / (1.0 + 0.01 * t) * (1.0 + 0.02 * math.sin(7.0 * t))
        out.append(gate.decide([i], [loss]))
    return out


def test_warmup_never_skips_and_measures_natural_rate():
    gate = BackwardGate(warmup=40, min_backward="auto")
    runs = _decreasing_stream(gate, 40)
    assert all(runs)
    assert gate.natural_skip_rate > 0.5  # falling losses sit under their EMA most of the time
    assert gate.floor == pytest.approx(max(0.5, 1 - 0.5 * gate.natural_skip_rate))


def test_skips_after_warmup_and_never_falls_below_floor():
    gate = BackwardGate(warmup=20, min_backward=0.6)
    runs = _decreasing_stream(gate, 20)
    post = []
    for t in range(20, 400):
        i = t % 4
        post.append(gate.decide([i], [1.0 / (1.0 + 0.01 * t)]))
        # The share is checked after every single decision, not only at the end.
        assert gate.post_backward / gate.post_decisions >= 0.6 - 1e-12
    assert all(runs)
    assert not all(post), "a steadily falling loss must let the gate skip"
    assert gate.skip_rate == pytest.approx(1 - sum(post) / len(post))
    assert gate.skip_rate > 0.3


def test_rising_loss_never_skips():
    gate = BackwardGate(warmup=4, min_backward=0.0)
    for t in range(100):
        assert gate.decide([t % 3], [1.0 + 0.05 * t])


def test_unseen_sample_always_trains():
    gate = BackwardGate(warmup=0, min_backward=0.0)
    gate.decide([0], [1.0])
    assert gate.decide([1], [1e-9])  # no baseline yet for sample 1
    assert not gate.decide([0], [0.5])  # sample 0 is under its baseline


def test_disabled_gate_always_runs():
    gate = BackwardGate(warmup=0, min_backward=0.0, enabled=False)
    assert all(gate.decide([0], [1.0 / (t + 1)]) for t in range(50))


def test_state_round_trip_continues_identically():
    a = BackwardGate(warmup=10, min_backward="auto")
    _decreasing_stream(a, 60)
    b = BackwardGate(warmup=10, min_backward="auto")
    b.load_state_dict(a.state_dict())
    for t in range(60, 160):
        i = t % 4
        loss = 1.0 / (1.0 + 0.01 * t)
        assert a.decide([i], [loss]) == b.decide([i], [loss])
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("bad", [{"decay": 1.0}, {"min_backward": 1.5}, {"min_backward": "x"}])
def test_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        BackwardGate(**bad)


def test_warmup_shorter_than_an_epoch_is_reported():
    gate = BackwardGate(warmup=2, min_backward="auto")
    gate.decide([0], [1.0])
    gate.decide([1], [1.0])  # every warm-up decision saw a new sample
    assert gate.floor == 1.0 and "warm-up" in gate.note


def test_per_sample_select_trains_samples_above_baseline_and_keeps_the_budget():
    gate = BackwardGate(warmup=2, min_backward=0.5)
    ids = [0, 1, 2, 3]
    assert gate.select(ids, [1.0, 1.0, 1.0, 1.0]) == [True] * 4  # warm-up
    assert gate.select(ids, [1.0, 1.0, 1.0, 1.0]) == [True] * 4
    # Samples 1 and 3 got worse: they train; the others are below baseline, but the budget
    # (half of all samples so far) is already met by them, so they skip.
    keep = gate.select(ids, [0.5, 2.0, 0.5, 3.0])
    assert keep == [False, True, False, True]
    # Everything improving: the budget forces the highest ratios in (ties by id).
    keep = gate.select(ids, [0.1, 0.2, 0.4, 0.1])
    assert sum(keep) == 2 and keep[2]
    assert gate.post_backward / gate.post_decisions >= 0.5
    # An unseen sample always trains.
    assert gate.select([9], [5.0]) == [True]


def test_sample_gate_trains_in_the_engine(tmp_path, crops):
    from distill_helpers import TINY_STUDENT, TINY_TEACHER

    import fastsam3d
    from fastsam3d.testing import fixture_model
    from fastsam3d_distill.data import TensorCropDataset
    from fastsam3d_distill.engine import TrainConfig, Trainer
    from fastsam3d_distill.stage1 import DistillTask

    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER).image_encoder
    student = fastsam3d.build_model("fastsam3d", **TINY_STUDENT).image_encoder.train()
    task = DistillTask(student, teacher, loss="neck")
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        epochs=4,
        batch_size=2,
        precision="fp32",
        device="cpu",
        resume=False,
        tensorboard=False,
        progress=False,
        log_every=1,
        gate=True,
        gate_mode="sample",
        gate_warmup=2,
        gate_min_backward=0.5,
        lr=1e-3,
    )
    res = Trainer(task, TensorCropDataset(crops[0]), cfg).fit()
    assert res["gate"]["gate/backward_share"] >= 0.5
    assert res["opt_steps"] >= 2
