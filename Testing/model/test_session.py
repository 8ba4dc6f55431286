"""Session behaviour users depend on: caching, prompts, undo, large objects, boxes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from session_stubs import ThresholdModel, dice

from fastsam3d.session import Result, Session, SessionError, paste_result
from fastsam3d.volume import Volume, VolumeError

pytestmark = pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")


def _blob_volume(shape=(40, 60, 70), spacing=(1.0, 1.2, 2.0), centre=(35, 30, 20), radius=18.0):
    """A bright ball (in voxels of i, j, k) on a dark background; array [k, j, i]."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d = np.sqrt((i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2)
    arr = np.where(d < radius, 100.0 + i * 0.5, 0.0).astype(np.float32)
    m = np.diag([*spacing, 1.0])
    m[:3, 3] = [-20.0, 15.0, -40.0]
    return Volume(arr, m), (d < radius)


def _session(model=None, **kw) -> Session:
    # The stubs count their own calls: run them exactly, not through a prepared bf16 copy.
    kw.setdefault("precision", "fp32")
    return Session(model or ThresholdModel(), device="cpu", warmup=False, **kw)


def _two_balls() -> Volume:
    """Two balls 280 mm apart along S: farther than one crop (192 mm)."""
    shape = (200, 40, 40)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    arr = np.zeros(shape, np.float32)
    for kc in (30, 170):
        arr[(i - 20) ** 2 + (j - 20) ** 2 + ((k - kc) * 2.0 / 1.5) ** 2 < 12**2] = 100
    return Volume(arr + 0.01 * i, np.diag([1.5, 1.5, 2.0, 1.0]))


def test_stub_segments_the_ball_where_it_is() -> None:
    vol, truth = _blob_volume()
    s = _session()
    s.set_volume(vol)
    r = s.add_point(vol.ijk_to_ras_points([35, 30, 20]))
    assert isinstance(r, Result) and r.crops == 1
    assert dice(r.full_mask(), truth) > 0.9
    centroid = np.argwhere(r.full_mask()).mean(0)
    np.testing.assert_allclose(centroid, np.argwhere(truth).mean(0), atol=0.5)
    # the region is tight around the object, not the whole volume
    assert np.prod(r.mask.shape) < 0.6 * truth.size


def test_embedding_is_cached_and_previous_logits_are_fed_back() -> None:
    vol, _ = _blob_volume()
    model = ThresholdModel()
    s = _session(model)
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([35, 30, 20])
    s.add_point(p)
    s.add_point(p + [2.0, 0, 0], positive=False)
    s.add_point(p + [0, 2.0, 0])
    assert model.encoder_calls == 1
    first_mask = model.prompts[0][2]
    assert first_mask is not None and float(first_mask.abs().max()) == 0  # zeros, as reference
    assert float(model.prompts[1][2].abs().max()) > 0  # previous logits come back


@pytest.mark.parametrize(("policy", "counts"), [("newest", [1, 1, 1]), ("accumulate", [1, 2, 3])])
def test_point_policy(policy, counts) -> None:
    vol, _ = _blob_volume()
    model = ThresholdModel()
    s = _session(model, point_policy=policy)
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([35, 30, 20])
    for dx in (0.0, 3.0, -3.0):
        s.add_point(p + [dx, 0, 0], positive=dx >= 0)
    assert [pr[0].shape[1] for pr in model.prompts] == counts
    assert model.prompts[-1][1][0, -1].item() == 0  # the negative click is labelled 0


def test_policy_defaults_follow_the_model_config() -> None:
    from fastsam3d.testing import fixture_model

    s = Session(fixture_model("fastsam3d"), device="cpu", warmup=False)
    assert s.point_policy == "newest"
    assert _session().point_policy == "accumulate"  # no config: SAM-Med3D's behaviour


def test_click_coordinates_reach_the_prompt_encoder_in_crop_voxels() -> None:
    vol, _ = _blob_volume()
    model = ThresholdModel()
    s = _session(model)
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([35.2, 30.0, 20.0])
    s.add_point(p)
    start = s.crops[0]
    expected = s.lattice.ras_to_lattice(p) - np.array(start)
    np.testing.assert_allclose(model.prompts[0][0][0, 0].numpy(), expected, atol=1e-4)
    assert np.all(np.abs(expected - 64) <= 0.5)  # the crop is centred on the click


def test_click_outside_the_crop_adds_a_crop_and_undo_is_multi_level() -> None:
    vol = _two_balls()
    model = ThresholdModel()
    s = _session(model)
    s.set_volume(vol)
    p = vol.ijk_to_ras_points([20, 20, 30])
    r1 = s.add_point(p)
    assert r1.crops == 1 and not r1.full_mask()[100:].any()
    r2 = s.add_point(vol.ijk_to_ras_points([20, 20, 170]))  # 280 mm away: a new crop
    assert r2.crops == 2 and model.encoder_calls == 2
    assert r2.full_mask()[150:190].any() and r2.full_mask()[10:50].any()
    s.add_point(p, positive=False)
    s.undo()
    back = s.undo()
    np.testing.assert_array_equal(back.full_mask(), r1.full_mask())
    assert back.crops == 1
    s.undo()
    with pytest.raises(SessionError, match="nothing to undo"):
        s.undo()
    s.add_point(p)
    cleared = s.reset()
    assert cleared.voxels == 0 and not s.can_undo


def test_paste_result_touches_only_its_region() -> None:
    vol, _ = _blob_volume()
    s = _session()
    s.set_volume(vol)
    r = s.add_point(vol.ijk_to_ras_points([35, 30, 20]))
    lab = np.full(vol.shape, 7, dtype=np.uint8)
    before = lab.copy()
    paste_result(r, lab, value=3)
    outside = np.ones(vol.shape, bool)
    outside[r.region] = False
    np.testing.assert_array_equal(lab[outside], before[outside])
    np.testing.assert_array_equal(lab == 3, r.full_mask())
    # a shrinking correction clears its old voxels of that value, never other labels
    lab2 = np.zeros(vol.shape, np.uint8)
    paste_result(r, lab2, value=1)
    lab2[0, 0, 0] = 5
    empty = s.reset()
    paste_result(empty, lab2, value=1)
    assert not np.any(lab2 == 1) and lab2[0, 0, 0] == 5


def test_object_longer_than_two_crops_is_segmented_without_gaps() -> None:
    """A 330 mm rod along S (a crop is 192 mm): propagation over 50 %-overlapping crops."""
    shape = (200, 70, 70)  # [k, j, i]; 2 mm slices, 1.5 mm in-plane
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    z_mm = k * 2.0
    rod = ((i - 35) ** 2 + (j - 33) ** 2 < 16**2) & (z_mm >= 35) & (z_mm < 365)
    arr = np.where(rod, 100 + 10 * np.sin(z_mm / 17.0), 0).astype(np.float32)
    vol = Volume(arr, np.diag([1.5, 1.5, 2.0, 1.0]))
    model = ThresholdModel()
    s = _session(model)
    s.set_volume(vol)
    r = s.add_point(vol.ijk_to_ras_points([35, 33, 100]))
    full = r.full_mask()
    assert r.crops == 3 and model.encoder_calls == 3
    rows = np.nonzero(rod.any(axis=(1, 2)))[0][3:-3]  # away from the rod's rounded-off ends
    per_slice = full.sum(axis=(1, 2))[rows]
    truth_area = rod.sum(axis=(1, 2))[rows]
    assert np.all(per_slice >= 0.9 * truth_area)  # no slice thinned or empty at crop borders
    assert dice(full, rod) > 0.95
    # with one crop allowed, the mask stops at the crop (192 mm), it does not wrap or smear
    limited = _session(max_crops=1)
    limited.set_volume(vol)
    lm = limited.add_point(vol.ijk_to_ras_points([35, 33, 100])).full_mask()
    extent_mm = np.ptp(np.nonzero(lm.any(axis=(1, 2)))[0]) * 2.0
    assert 180 <= extent_mm <= 194
    assert limited.result.at_crop_limit and not r.at_crop_limit


def test_box_bounds_and_clips_the_result() -> None:
    vol, truth = _blob_volume(radius=10.0)
    s = _session()
    s.set_volume(vol)
    c = vol.ijk_to_ras_points([35, 30, 20])
    lo, hi = c - [30, 30, 4], c + [30, 30, 4]  # cuts the ball in S
    r = s.add_box(lo, hi)
    full = r.full_mask()
    k, j, i = np.nonzero(full)
    ras = vol.ijk_to_ras_points(np.stack([i, j, k], -1))
    assert full.any()
    assert np.all(ras >= lo - 1e-6) and np.all(ras <= hi + 1e-6)
    assert s.undo().voxels == 0


def test_large_box_uses_several_crops() -> None:
    shape = (30, 40, 250)  # 250 x 1.5 mm = 375 mm along R
    arr = np.zeros(shape, np.float32)
    arr[5:25, 10:30, 20:230] = 100
    arr += np.linspace(0, 1, shape[2], dtype=np.float32)
    vol = Volume(arr, np.diag([1.5, 1.5, 1.5, 1.0]))
    s = _session()
    s.set_volume(vol)
    r = s.add_box(vol.ijk_to_ras_points([15, 5, 2]), vol.ijk_to_ras_points([235, 35, 28]))
    assert r.crops >= 3
    truth = np.zeros(shape, bool)
    truth[5:25, 10:30, 20:230] = True
    assert dice(r.full_mask(), truth) > 0.95
    with pytest.raises(SessionError, match="max_crops"):
        small = _session(max_crops=2)
        small.set_volume(vol)
        small.add_box(vol.ijk_to_ras_points([0, 0, 0]), vol.ijk_to_ras_points([249, 39, 29]))


# --- bad input: a clear error, nothing changed -------------------------------------------------
def test_calls_before_set_volume() -> None:
    s = _session()
    for call in (
        lambda: s.add_point((0, 0, 0)),
        lambda: s.add_box((0, 0, 0), (1, 1, 1)),
        s.undo,
        s.reset,
    ):
        with pytest.raises(SessionError, match="set_volume"):
            call()


def test_bad_prompts_change_nothing() -> None:
    vol, _ = _blob_volume()
    model = ThresholdModel()
    s = _session(model)
    s.set_volume(vol)
    r = s.add_point(vol.ijk_to_ras_points([35, 30, 20]))
    calls = (model.encoder_calls, len(model.prompts))
    bad = [
        (lambda: s.add_point(vol.ijk_to_ras_points([-3, 25, 20])), "outside the volume"),
        (lambda: s.add_point(vol.ijk_to_ras_points([35, 30, 80])), "outside the volume"),
        (lambda: s.add_point((np.nan, 0, 0)), "finite"),
        (lambda: s.add_point((1, 2)), "three"),
        (lambda: s.add_box((0, 0, 0), (0, 5, 5)), "empty or inverted"),
        (lambda: s.add_box((10, 10, 10), (0, 20, 20)), "empty or inverted"),
        (lambda: s.add_box((1000, 1000, 1000), (1010, 1010, 1010)), "does not overlap"),
    ]
    for call, message in bad:
        with pytest.raises(SessionError, match=message):
            call()
    assert (model.encoder_calls, len(model.prompts)) == calls
    assert s.result is r and len(s.crops) == 1
    np.testing.assert_array_equal(s.undo().full_mask(), np.zeros(vol.shape, bool))


def test_constant_volume_is_refused_and_the_old_volume_kept() -> None:
    vol, _ = _blob_volume()
    s = _session()
    s.set_volume(vol)
    r = s.add_point(vol.ijk_to_ras_points([35, 30, 20]))
    with pytest.raises(VolumeError, match="constant"):
        s.set_volume(Volume(np.full((10, 10, 10), 3.0), np.eye(4)))
    assert s.volume is vol and s.result is r
    with pytest.raises(TypeError, match="Volume"):
        s.set_volume(np.zeros((10, 10, 10)))


def test_bad_model_and_options() -> None:
    with pytest.raises(TypeError, match="registry name"):
        Session(42, device="cpu", warmup=False)
    with pytest.raises(ValueError, match="point_policy"):
        _session(point_policy="all")


# --- invariance under storage orientation (fixture network) -----------------------------------
def test_same_physical_image_in_other_storage_orders_gives_the_same_mask() -> None:
    """RAS, LPS and permuted storage of one image: same world-space mask (fixture weights)."""
    from fastsam3d.testing import fixture_model

    rng = np.random.default_rng(3)
    base = rng.normal(size=(24, 28, 32)).astype(np.float32)
    base = torch.nn.functional.avg_pool3d(torch.from_numpy(base)[None], 3, 1, 1)[0].numpy()
    k, j, i = np.meshgrid(*[np.arange(n) for n in base.shape], indexing="ij")
    base += 3 * np.exp(-((i - 16) ** 2 + (j - 12) ** 2 + (k - 10) ** 2) / 30)
    m_ras = np.diag([1.1, 0.9, 2.5, 1.0])
    m_ras[:3, 3] = [-10, 5, 20]
    variants = {"ras": (base, m_ras, lambda a: a)}
    # LPS storage: i and j reversed
    m_lps = m_ras.copy()
    m_lps[:3, 0] *= -1
    m_lps[:3, 1] *= -1
    m_lps[:3, 3] = m_ras[:3, :3] @ [base.shape[2] - 1, base.shape[1] - 1, 0] + m_ras[:3, 3]
    variants["lps"] = (base[:, ::-1, ::-1].copy(), m_lps, lambda a: a[:, ::-1, ::-1])
    # permuted storage: array [i, k, j] order, i.e. new (i', j', k') = (j, k, i)
    m_perm = np.eye(4)
    m_perm[:3, :3] = m_ras[:3, :3][:, [1, 2, 0]]
    m_perm[:3, 3] = m_ras[:3, 3]
    variants["perm"] = (base.transpose(2, 0, 1).copy(), m_perm, lambda a: a.transpose(1, 2, 0))
    click = m_ras[:3, :3] @ [16, 12, 10] + m_ras[:3, 3]
    s = Session(fixture_model("fastsam3d"), device="cpu", warmup=False)
    masks = {}
    for name, (arr, m, back) in variants.items():
        s.set_volume(Volume(arr, m))
        full = s.add_point(click).full_mask()
        masks[name] = back(full)
    assert masks["ras"].any() and not masks["ras"].all()
    for name in ("lps", "perm"):
        assert dice(masks[name], masks["ras"]) >= 0.95, name


@pytest.mark.parametrize("dtype", [">f4", np.uint16, np.int16])
def test_file_dtypes_are_accepted_without_changing_the_result(dtype) -> None:
    """Big-endian (NIfTI via nibabel), unsigned and integer arrays segment like float32."""
    vol, _ = _blob_volume()
    ref = _session()
    ref.set_volume(vol)
    p = vol.ijk_to_ras_points([35, 30, 20])
    expected = ref.add_point(p).full_mask()
    arr = np.round(vol.array).astype(dtype)
    arr.setflags(write=False)
    s = _session()
    s.set_volume(Volume(arr, vol.ijk_to_ras))
    assert dice(s.add_point(p).full_mask(), expected) > 0.99


def test_partial_upsample_gives_the_same_mask_as_the_full_one() -> None:
    """Paste-back upsamples only around the positive logits; the mask must not change."""
    from fastsam3d import geometry as geo

    vol, _ = _blob_volume()
    s = _session()
    s.set_volume(vol)
    s.add_point(vol.ijk_to_ras_points([35, 30, 20]))
    tile = next(iter(s._state.tiles.values()))
    torch.manual_seed(0)
    for trial in range(4):
        low = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 32, 32, 32), 5, 1, 2) * 10 - 2.5
        if trial == 3:
            low[..., :20, :, :] = -5.0  # positives only in one corner
        t = type(tile)(tile.start, low)
        start, part = s._upsampled_part(t)
        region = tuple(slice(0, n) for n in vol.shape)
        full = geo.sample_field(
            (geo.upsample_logits(low) > 0)[None], t.start, s.lattice, vol.ijk_to_ras, region
        )[0]
        ours = geo.sample_field((part > 0)[None], start, s.lattice, vol.ijk_to_ras, region)[0]
        assert torch.equal(full, ours), trial


def test_session_accepts_a_checkpoint_path(tmp_path) -> None:
    from fastsam3d.checkpoint import save_official
    from fastsam3d.testing import fixture_model

    path = tmp_path / "FastSAM3D.pth"
    save_official(fixture_model("fastsam3d"), path)
    s = Session(str(path), device="cpu", warmup=False)
    assert s.model.config.name == "fastsam3d" and s.point_policy == "newest"


def test_result_repr_is_short_and_says_what_it_holds():
    """newcomer p5: print(result) dumped the whole mask array."""
    from fastsam3d.result import Result

    mask = np.zeros((40, 50, 60), bool)
    mask[5:9, 5:9, 5:9] = True
    r = Result((slice(10, 50), slice(0, 50), slice(3, 63)), mask, (100, 100, 100), crops=1)
    text = repr(r)
    assert len(text) < 200 and "voxels=64" in text and "10:50" in text
