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
