"""The Runner: exact fp32 path, CUDA fast path (skipped without a GPU), graph-cache logic with a
CPU stand-in for CUDA graphs, and the separable paste the click + paste graph runs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fastsam3d import geometry as geo
from fastsam3d.clickpaste import click_and_paste, crop_footprint, paste_field, paste_plan
from fastsam3d.fastpath import Captured, GraphCache, Runner, click_key
from fastsam3d.testing import fixture_model

TINY = {"depth": 2, "embed_dim": 96, "num_heads": 2, "num_attn_free_blocks": 1}


def rel(a: torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    b = torch.as_tensor(b).double()
    return float((a.double() - b).norm() / b.norm())


@pytest.fixture(scope="module")
def golden(parity_dir):
    return {k: torch.from_numpy(v) for k, v in np.load(parity_dir / "parity.npz").items()}


@pytest.fixture(scope="module")
def fastsam():
    return fixture_model("fastsam3d")


# --- exact path -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case,pts,labels,mask,multi",
    [
        ("click1", "points1", "labels1", "zeros", False),
        ("click3", "points3", "labels3", "click1", False),
        ("multimask", "points3", "labels3", "click1", True),
    ],
)
def test_fp32_runner_click_is_the_parity_path(golden, fastsam, case, pts, labels, mask, multi):
    runner = Runner(fastsam, "cpu", "fp32")
    m = torch.zeros(1, 1, 32, 32, 32) if mask == "zeros" else golden["fastsam3d_click1_lowres"]
    low, iou = runner.click(golden["fastsam3d_embedding"], golden[pts], golden[labels], m, multi)
    assert low.dtype == torch.float32 and low.shape == golden[f"fastsam3d_{case}_lowres"].shape
    assert rel(low, golden[f"fastsam3d_{case}_lowres"]) < 1e-4
    assert rel(iou, golden[f"fastsam3d_{case}_iou"]) < 1e-4


def test_padding_point_changes_logits(golden, fastsam):
    """Why graphs are captured per point count: padding a click to a fixed number of points
    with label -1 ("not a point") is not neutral, the decoder attends to that token."""
    runner = Runner(fastsam, "cpu", "fp32")
    emb, c, lab = golden["fastsam3d_embedding"], golden["points1"], golden["labels1"]
    zeros = torch.zeros(1, 1, 32, 32, 32)
    plain, _ = runner.click(emb, c, lab, zeros)
    padded, _ = runner.click(
        emb,
        torch.cat([c, torch.zeros_like(c)], 1),
        torch.cat([lab, -torch.ones_like(lab)], 1),
        zeros,
    )
    assert rel(padded, plain) > 1e-3


def test_graphs_need_cuda_and_precision_is_checked():
    model = fixture_model("fastsam3d", **TINY)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Runner(model, "cpu", "fp32", graphs=True)
    with pytest.raises(ValueError, match="precision"):
        Runner(model, "cpu", "fp16")
    r = Runner(model, "cpu", "fp32")
    assert r.graphs is None and not r.cuda_fast


def test_warmup_prepares_the_cpu_path():
    r = Runner(fixture_model("fastsam3d", **TINY), "cpu", "fp32")
    said: list[str] = []
    secs = r.warmup(progress=said.append)
    assert secs > 0 and said == []  # progress messages are for the CUDA preparation only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_path_is_default_and_matches_its_eager_run(golden):
    model = fixture_model("fastsam3d", device="cuda")
    r = Runner(model, "cuda")
    assert r.precision == "bf16" and r.cuda_fast and r.graphs is not None
    said: list[str] = []
    r.warmup(progress=said.append)
    assert said and "ready" in said[-1]
    x = golden["input"].cuda()
    emb = r.encode(x)
    assert emb.dtype == torch.float32
    assert rel(emb.cpu(), golden["fastsam3d_embedding"]) < 2e-2
    assert rel(emb, r._encode_eager(x)[0]) < 1e-3
    low, _ = r.click(emb, golden["points1"], golden["labels1"], torch.zeros(1, 1, 32, 32, 32))
    assert rel(low.cpu(), golden["fastsam3d_click1_lowres"]) < 2e-2
    assert not any(r.graphs.failed(k) for k in r.graphs.entries)


# --- graph cache (CPU stand-in for capture) ---------------------------------------------------
def fake_capture(calls: list):
    """Capture = static input clones + outputs written in place on replay, like a CUDA graph."""

    def capture(fn, example):
        calls.append(len(example))
        static = tuple(None if t is None else t.clone() for t in example)
        outs = tuple(o.clone() for o in fn(*static))

        def replay():
            for o, new in zip(outs, fn(*static)):
                o.copy_(new)

        return Captured(replay, static, outs)

    return capture


def test_graph_cache_copies_inputs_in_and_clones_outputs():
    calls: list = []
    cache = GraphCache(fake_capture(calls))

    def fn(a, b):
        return (a * 2 + (0 if b is None else b),)

    (r1,) = cache.run("k", fn, (torch.ones(3), None))
    (r2,) = cache.run("k", fn, (torch.full((3,), 5.0), None))
    assert calls == [2]  # captured once for the key
    assert torch.equal(r1, torch.full((3,), 2.0))  # not overwritten by the next replay
    assert torch.equal(r2, torch.full((3,), 10.0))  # the new input reached the graph
    (r3,) = cache.run("other", fn, (torch.ones(3), torch.ones(3)))
    assert torch.equal(r3, torch.full((3,), 3.0)) and calls == [2, 2]


def test_graph_cache_falls_back_to_eager_once_capture_fails(caplog):
    attempts = []

    def broken(fn, example):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    cache = GraphCache(broken)
    with caplog.at_level(logging.WARNING, logger="fastsam3d.fastpath"):
        for v in (1.0, 4.0):
            (out,) = cache.run("k", lambda a: (a + 1,), (torch.tensor([v]),))
            assert float(out) == v + 1
    assert attempts == [1] and cache.failed("k")
    assert "capture failed" in caplog.text


def test_graph_cache_bounds_its_entries():
    calls: list = []
    cache = GraphCache(fake_capture(calls), max_entries=1)
    cache.run("a", lambda x: (x,), (torch.ones(1),))
    (out,) = cache.run("b", lambda x: (x * 3,), (torch.ones(1),))
    assert float(out) == 3.0 and calls == [1] and "b" not in cache


def test_click_key_separates_signatures():
    c1, c2 = torch.zeros(1, 1, 3), torch.zeros(1, 2, 3)
    m = torch.zeros(1, 1, 32, 32, 32)
    keys = {
        click_key(c1, m, False),
        click_key(c2, m, False),
        click_key(c1, None, False),
        click_key(c1, m, True),
    }
    assert len(keys) == 4
    assert click_key(c1, m, False) == click_key(torch.ones(1, 1, 3), m * 2, False)


# --- paste ------------------------------------------------------------------------------------
def numpy_paste(field: np.ndarray, maps, mode: str) -> np.ndarray:
    """Voxel-by-voxel reference of the separable paste."""
    s = field.shape[0]
    shape = [0, 0, 0]
    for q, c in maps:
        shape[q] = len(c)
    out = np.zeros(shape, dtype=bool)
    for idx in np.ndindex(*shape):
        c = np.array([maps[a][1][idx[maps[a][0]]] for a in range(3)])
        if np.any(c < -0.5) or np.any(c >= s - 0.5):
            continue
        if mode == "nearest":
            i = np.clip(np.floor(c + 0.5), 0, s - 1).astype(int)
            out[idx] = field[tuple(i)] > 0
        else:
            cc = np.clip(c, 0, s - 1)
            i0 = np.floor(cc).astype(int)
            i1 = np.minimum(i0 + 1, s - 1)
            w = cc - i0
            v = 0.0
            for corner in np.ndindex(2, 2, 2):
                ii = tuple(i1[a] if corner[a] else i0[a] for a in range(3))
                v += np.prod([w[a] if corner[a] else 1 - w[a] for a in range(3)]) * field[ii]
            out[idx] = v > 0
    return out


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_paste_field_matches_voxelwise_reference(mode):
    rng = np.random.default_rng(3)
    s = 8
    field = rng.normal(size=(s, s, s)).astype(np.float32)
    # crop axis 0 runs along region axis 2 (flipped), 1 along 0, 2 along 1; some voxels outside
    maps = [
        (2, 7.5 - 0.7 * np.arange(6)),
        (0, -1.2 + 0.5 * np.arange(5)),
        (1, 0.5 + 1.5 * np.arange(7)),
    ]
    plan = paste_plan(maps, s, mode)
    got = paste_field(torch.from_numpy(field), plan.axes, plan.mode, plan.tensors)
    assert got.shape == plan.shape == (5, 7, 6)
    np.testing.assert_array_equal(got.numpy(), numpy_paste(field, maps, mode))


def test_paste_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="paste mode"):
        paste_plan([(0, np.zeros(2)), (1, np.zeros(2)), (2, np.zeros(2))], 8, "cubic")
    with pytest.raises(ValueError, match="each region axis once"):
        paste_plan([(0, np.zeros(2)), (0, np.zeros(2)), (2, np.zeros(2))], 8)


def test_click_and_paste_lands_on_the_original_grid(golden, fastsam):
    """An LPS-oriented, anisotropic volume: the crop footprint's plan (axis order, flips) puts
    every original voxel on the nearest crop voxel by the full 4x4 geometry."""
    from fastsam3d.volume import Volume

    shape = (40, 70, 60)  # k, j, i
    m = np.array([[-0.9, 0, 0, 20.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    vol = Volume(np.zeros(shape, np.float32), m)
    lat = geo.Lattice.for_volume(m, shape)
    start = (-60, -70, -50)
    region, plan = crop_footprint(lat, m, start, shape)
    runner = Runner(fastsam, "cpu", "fp32")
    low, _, mask = click_and_paste(
        runner,
        golden["fastsam3d_embedding"],
        golden["points1"],
        golden["labels1"],
        torch.zeros(1, 1, 32, 32, 32),
        plan,
    )
    assert mask.dtype == torch.bool and tuple(mask.shape) == plan.shape
    assert plan.shape == tuple(s.stop - s.start for s in region)
    field = geo.upsample_logits(low[:1, :1]).numpy()
    # reference: every voxel of the region through the full matrices
    to_lat = geo._region_to_lattice(lat, vol.ijk_to_ras, region)
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in plan.shape], indexing="ij"), -1)
    c = kji.reshape(-1, 3) @ to_lat[:3, :3].T + to_lat[:3, 3] - np.asarray(start)
    inside = np.all((c >= -0.5) & (c < 127.5), axis=1)
    i = np.clip(np.floor(c + 0.5), 0, 127).astype(int)
    ref = (field[i[:, 0], i[:, 1], i[:, 2]] > 0) & inside
    np.testing.assert_array_equal(mask.numpy().reshape(-1), ref)
    assert 0 < ref.sum() < ref.size or not ref.any()
