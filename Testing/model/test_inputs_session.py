"""Issue 11, "Session" rule: safe under concurrent use, bounded undo history, no stale embedding
when the caller's array changes, and bad prompts / data refused with SessionError / VolumeError
(reliability review #8, #13, #14, #23, #25). Each test fails on the code before the fix."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from session_stubs import ThresholdModel

from fastsam3d.session import Session, SessionError
from fastsam3d.volume import Volume, VolumeError

pytestmark = pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")


def _ball(centre=(20, 20, 15), shape=(30, 40, 40)) -> Volume:
    """A bright ball (i, j, k voxel centre) on a dark, slightly ramped background."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d = np.sqrt((i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2)
    arr = (np.where(d < 8, 100.0, 0.0) + 0.01 * i).astype(np.float32)
    return Volume(arr, np.diag([1.5, 1.5, 1.5, 1.0]))


def _session(model=None, **kw) -> Session:
    kw.setdefault("precision", "fp32")
    return Session(model or ThresholdModel(), device="cpu", warmup=False, **kw)


def _slow(model: ThresholdModel, seconds: float) -> ThresholdModel:
    """Make every decoder call take ``seconds`` so that two threads overlap inside a click."""
    decode = model.mask_decoder.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    model.mask_decoder.forward = slow
    return model


def _run(*targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn, delay):
        def go():
            time.sleep(delay)
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 (reported to the test)
                errors.append(e)

        return go

    threads = [threading.Thread(target=wrap(fn, delay)) for fn, delay in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


# --- concurrency (#13) ----------------------------------------------------------------------


def test_two_threads_clicking_keep_both_clicks() -> None:
    vol = _ball()
    s = _session(_slow(ThresholdModel(), 0.3))
    s.set_volume(vol)
    a, b = vol.ijk_to_ras_points([20, 20, 15]), vol.ijk_to_ras_points([22, 21, 16])
    assert _run((lambda: s.add_point(a), 0.0), (lambda: s.add_point(b, False), 0.05)) == []
    # Before the lock: 1 click in the state but 2 undo steps (one click silently lost).
    assert len(s._state.clicks) == 2
    s.undo()
    s.undo()
    assert s.crops == [] and not s.can_undo


def test_undo_racing_a_click_is_not_lost() -> None:
    vol = _ball()
    s = _session(_slow(ThresholdModel(), 0.3))
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([20, 20, 15])
    s.add_point(p)
    assert _run((lambda: s.add_point(p), 0.0), (s.undo, 0.05)) == []
    # Serialised: the click lands, then the undo removes it, back to one click.
    assert len(s._state.clicks) == 1


def test_set_volume_racing_a_click_never_mixes_volumes() -> None:
    vol, vol2 = _ball(), _ball(centre=(10, 12, 8), shape=(20, 30, 50))
    s = _session(_slow(ThresholdModel(), 0.3))
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([20, 20, 15])
    assert _run((lambda: s.add_point(p), 0.0), (lambda: s.set_volume(vol2), 0.05)) == []
    # set_volume waited for the click, then started a new object on vol2: no crop of the old
    # lattice survives (before, the old click was committed after the switch).
    assert s.volume is vol2 and s.crops == [] and s.result is None


# --- bounded history (#14) ------------------------------------------------------------------


def test_undo_history_is_bounded_and_configurable() -> None:
    vol = _ball()
    assert _session().max_undo == 100
    s = _session(max_undo=4)
    s.set_volume(vol)
    rng = np.random.default_rng(0)
    for _ in range(10):
        s.add_point(
            vol.ijk_to_ras_points(rng.uniform([15, 15, 10], [25, 25, 20])),
            positive=bool(rng.random() < 0.7),
        )
    assert len(s._history) == 4
    for _ in range(4):
        s.undo()
    assert len(s._state.clicks) == 6  # the newest 4 steps were undone, older ones dropped
    with pytest.raises(SessionError, match="nothing to undo"):
        s.undo()
    off = _session(max_undo=0)
    off.set_volume(vol)
    off.add_point(vol.ijk_to_ras_points([20, 20, 15]))
    assert not off.can_undo
    with pytest.raises(ValueError, match="max_undo"):
        _session(max_undo=-1)


def test_embedding_cache_is_bounded() -> None:
    vol = Volume(
        np.random.default_rng(1).random((60, 60, 300)).astype(np.float32) + 1,
        np.diag([1.5, 1.5, 1.5, 1.0]),
    )
    s = _session(max_crops=1, max_embeddings=2, propagate=False)
    s.set_volume(vol)
    for i in (30, 150, 270):  # crops 192 mm apart along R: a new embedding each
        s.reset()
        s.add_point(vol.ijk_to_ras_points([i, 30, 30]))
    assert len(s._embeddings) == 2


# --- stale data (#23, #8) -------------------------------------------------------------------


def test_in_place_edit_of_the_array_is_picked_up() -> None:
    vol = _ball()
    s = _session()
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([20, 20, 15])
    before = s.add_point(p).full_mask()
    # The caller moves the ball 6 voxels along i in place, without calling set_volume.
    moved = _ball(centre=(26, 20, 15)).array
    vol.array[...] = moved
    s.reset()
    with pytest.warns(RuntimeWarning, match="changed since set_volume"):
        after = s.add_point(p).full_mask()
    fresh = _session()
    fresh.set_volume(Volume(moved.copy(), vol.ijk_to_ras))
    expected = fresh.add_point(p).full_mask()
    assert not np.array_equal(after, before), "the cached embedding of the old data was used"
    np.testing.assert_array_equal(after, expected)
    # set_volume after editing re-embeds too, and an unchanged array gives no warning.
    s.set_volume(vol)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        np.testing.assert_array_equal(s.add_point(p).full_mask(), expected)


def test_session_does_not_share_the_callers_memory() -> None:
    vol = _ball()
    s = _session()
    s.set_volume(vol)
    assert not np.shares_memory(s._tensor.numpy(), vol.array)


def test_non_finite_voxels_written_after_construction_are_refused() -> None:
    vol = _ball()
    vol.array[3, 4, 5] = np.nan
    s = _session()
    with pytest.raises(VolumeError, match="NaN or Inf"):
        s.set_volume(vol)
    big = Volume(np.full((20, 20, 20), 1e300) * np.linspace(1, 2, 20), np.eye(4))
    with pytest.raises(VolumeError, match="overflow"):
        s.set_volume(big)
    # A NaN written in place after set_volume is refused at the next click, state unchanged.
    good = _ball()
    s.set_volume(good)
    p = good.ijk_to_ras_points([20, 20, 15])
    first = s.add_point(p)
    good.array[0, 0, 0] = np.inf
    with pytest.raises(VolumeError, match="NaN or Inf"):
        s.add_point(p)
    assert s.result is first and len(s._state.clicks) == 1


def test_non_finite_logits_raise_instead_of_an_empty_mask() -> None:
    model = ThresholdModel()
    decode = model.mask_decoder.forward
    model.mask_decoder.forward = lambda *a, **k: (
        decode(*a, **k)[0] * float("nan"),
        torch.ones(1, 1),
    )
    vol = _ball()
    s = _session(model)
    s.set_volume(vol)
    with pytest.raises(SessionError, match="NaN/Inf logits"):
        s.add_point(vol.ijk_to_ras_points([20, 20, 15]))
    assert s.result is None and s.crops == []


# --- prompt types (#25) ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1,2,3", {"r": 1, "a": 2, "s": 3}, object()])
def test_point_of_the_wrong_type_is_a_session_error(bad) -> None:
    vol = _ball()
    s = _session()
    s.set_volume(vol)
    with pytest.raises(SessionError, match="three finite RAS coordinates"):
        s.add_point(bad)


@pytest.mark.parametrize("bad", ["no", "false", 2, None])
def test_positive_must_be_a_boolean(bad) -> None:
    vol = _ball()
    s = _session()
    s.set_volume(vol)
    with pytest.raises(SessionError, match="positive must be True or False"):
        s.add_point(vol.ijk_to_ras_points([20, 20, 15]), positive=bad)
    assert s.result is None
    s.add_point(vol.ijk_to_ras_points([20, 20, 15]), positive=np.bool_(True))
    s.add_point(vol.ijk_to_ras_points([20, 20, 15]), positive=0)
