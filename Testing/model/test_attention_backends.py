"""FlexAttention dense backend and the 3D sparse attention option agree with their references.

Dense backends must give the official weights' function (einsum reference, 1e-4 relative);
every sparse implementation must give softmax over the same union mask with the same rel-pos
bias as the masked einsum. The flash path's fold-and-merge math runs with a pure-torch kernel
of flash_attn_func's contract, so it is tested without flash-attn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsam3d
from fastsam3d.modeling import attention
from fastsam3d.modeling import sparse as sa
from fastsam3d.modeling.attention import Attention
from fastsam3d.modeling.rel_pos import dense_bias, rel_pos_terms
from fastsam3d.testing import fixture_model, recipe_tensor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def masked_einsum(q, k, v, terms, scale, mask):
    """Textbook masked softmax attention, independent of the module's helpers."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if terms is not None:
        logits = logits + dense_bias(terms)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1) @ v


def random_qkv(grid, b=1, heads=2, hd=16, seed=0, rel_pos=True):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(b, heads, n, hd, generator=g) for _ in range(3))
    terms = None
    if rel_pos:
        tables = tuple(0.3 * torch.randn(2 * s - 1, hd, generator=g) for s in grid)
        terms = rel_pos_terms(q, tables, grid, grid)
    return q, k, v, terms, hd**-0.5


# ----------------------------------------------------------------------------- dense flex


@pytest.fixture(scope="module")
def parity_input(parity_dir):
    return torch.from_numpy(np.load(parity_dir / "parity.npz")["input"]).float()


@pytest.fixture(scope="module")
def fastsam3d_fixture():
    return fixture_model("fastsam3d")


@pytest.fixture(scope="module")
def einsum_embedding(fastsam3d_fixture, parity_input):
    """The reference backend's embedding of the parity input (fixture weights)."""
    with torch.no_grad():
        fastsam3d.set_attention_backend(fastsam3d_fixture, "einsum")
        return fastsam3d_fixture.image_encoder(parity_input)


def test_flex_dense_matches_einsum_on_fastsam3d_encoder(
    parity_input, fastsam3d_fixture, einsum_embedding
):
    with torch.no_grad():
        fastsam3d.set_attention_backend(fastsam3d_fixture, "flex")
        out = fastsam3d_fixture.image_encoder(parity_input)
    assert out.shape == (1, 384, 8, 8, 8)
    assert rel_err(out, einsum_embedding) < 1e-4


def test_flex_dense_matches_einsum_on_sam_med3d_global_block():
    # SAM-Med3D's windowed blocks (8^3 grid in a 14^3 window) always take the closed form in
    # attention.py, whatever the backend; the flex backend runs in its global blocks (2,5,8,11).
    # Block 2's attention with its recipe weights, without building the whole 12-block model:
    cfg = fastsam3d.get_config("sam-med3d-turbo")
    assert 2 in cfg.global_attn_indexes
    attn = Attention(cfg.embed_dim, cfg.num_heads, input_size=(8, 8, 8))
    with torch.no_grad():
        for name, t in attn.state_dict().items():
            t.copy_(recipe_tensor(f"image_encoder.blocks.2.attn.{name}", t.shape))
    x = torch.randn(1, 8, 8, 8, cfg.embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        attn.backend = "einsum"
        ref = attn(x)
        attn.backend = "flex"
        out = attn(x)
    assert rel_err(out, ref) < 1e-4


def test_flex_dense_without_rel_pos_and_on_cpu_training():
    grid = (4, 4, 4)
    q, k, v, terms, scale = random_qkv(grid, rel_pos=False)
    assert (
        rel_err(
            sa.flex_dense(q, k, v, None, scale, grid), masked_einsum(q, k, v, None, scale, None)
        )
        < 1e-5
    )
    # FlexAttention has no CPU backward: with gradients the same function runs via SDPA.
    q, k, v, terms, scale = random_qkv(grid)
    q.requires_grad_(True)
    terms = rel_pos_terms(q, tuple(0.3 * torch.ones(7, 16) for _ in range(3)), grid, grid)
    out = sa.flex_dense(q, k, v, terms, scale, grid)
    out.square().sum().backward()
    g_flex = q.grad.clone()
    q.grad = None
    terms = rel_pos_terms(q, tuple(0.3 * torch.ones(7, 16) for _ in range(3)), grid, grid)
    masked_einsum(q, k, v, terms, scale, None).square().sum().backward()
    assert rel_err(g_flex, q.grad) < 1e-5


def test_terms_for_non_cubic_grid_are_refused():
    grid = (4, 4, 4)
    q, k, v, terms, scale = random_qkv(grid)
    with pytest.raises(ValueError, match="cubic"):
        sa.flex_dense(q, k, v, terms, scale, (2, 8, 4))


# ----------------------------------------------------------------------------- the pattern


def coords(grid):
    d, h, w = grid
    t = torch.arange(d * h * w)
    return torch.stack([t // (h * w), (t // w) % h, t % w], -1)


def token(grid, c):
    return (c[0] * grid[1] + c[1]) * grid[2] + c[2]


def test_local_block_members():
    grid = (8, 8, 8)
    row = sa.SparsePattern(((4, 1),)).mask(grid)[token(grid, (1, 6, 3))]
    c = coords(grid)
    expected = (c[:, 0] < 4) & (c[:, 1] >= 4) & (c[:, 2] < 4)
    assert torch.equal(row, expected) and int(row.sum()) == 64


def test_dilated_members_span_the_volume():
    grid = (8, 8, 8)
    row = sa.SparsePattern(((0, 2),)).mask(grid)[token(grid, (1, 6, 3))]
    c = coords(grid)
    expected = (c[:, 0] % 2 == 1) & (c[:, 1] % 2 == 0) & (c[:, 2] % 2 == 1)
    assert torch.equal(row, expected) and int(row.sum()) == 64


def test_dilated_block_members():
    # (8, 2) on 16^3: stride-2 sub-grid inside the query's own 8^3 block only.
    grid = (16, 16, 16)
    row = sa.SparsePattern(((8, 2),)).mask(grid)[token(grid, (9, 2, 15))]
    c = coords(grid)
    expected = (
        (c[:, 0] >= 8)
        & (c[:, 0] % 2 == 1)
        & (c[:, 1] < 8)
        & (c[:, 1] % 2 == 0)
        & (c[:, 2] >= 8)
        & (c[:, 2] % 2 == 1)
    )
    assert torch.equal(row, expected)


@pytest.mark.parametrize("grid", [(8, 8, 8), (16, 16, 16), (6, 8, 10)])
def test_union_self_symmetry_and_density(grid):
    pattern = sa.SparsePattern(((4, 1), (8, 2), (0, 4)))
    mask = pattern.mask(grid)
    singles = [sa.SparsePattern((br,)).mask(grid) for br in pattern.branches]
    assert torch.equal(mask, singles[0] | singles[1] | singles[2])
    assert bool(mask.diagonal().all())
    assert torch.equal(mask, mask.T)  # membership is "same group": an equivalence
    n = mask.shape[0]
    assert pattern.density(grid) == pytest.approx(float(mask.sum()) / n**2)
    assert torch.equal(pattern.keys_per_query(grid), mask.sum(-1))


def test_default_pattern_key_counts():
    # Inclusion-exclusion by hand: 8^3: 64 + 64 - 8 (the (16,4) branch adds nothing);
    # 16^3: 64 + 64 + 64 - 8 (4^3 & stride 2) - 8 (8^3 & stride 4) = 176.
    pattern = sa.SparsePattern()
    assert set(pattern.keys_per_query((8, 8, 8)).tolist()) == {120}
    assert set(pattern.keys_per_query((16, 16, 16)).tolist()) == {176}
    assert "of 4096 keys per query" in pattern.describe((16, 16, 16))


def test_invalid_patterns_are_refused():
    with pytest.raises(ValueError, match="dilation"):
        sa.SparsePattern(((4, 0),))
    with pytest.raises(ValueError, match="at least one"):
        sa.SparsePattern(())
    with pytest.raises(ValueError, match="impl"):
        sa.SparsePattern(impl="cuda")
    with pytest.raises(ValueError, match="power of two"):
        sa.SparsePattern(flex_block=96)
    q, k, v, terms, scale = random_qkv((4, 4, 4))
    with pytest.raises(TypeError, match="SparsePattern"):
        sa.sparse_attention(q, k, v, terms, scale, (4, 4, 4), ((2, 1),))


# ----------------------------------------------------------------------------- sparse impls


@pytest.mark.parametrize("impl", ["flex", "flex_union"])
@pytest.mark.parametrize("g", [8, 16])
def test_sparse_flex_matches_masked_einsum(impl, g):
    grid = (g, g, g)
    q, k, v, terms, scale = random_qkv(grid, b=1, heads=2 if g == 8 else 1, hd=8, seed=g)
    pattern = sa.SparsePattern(impl=impl)
    ref = masked_einsum(q, k, v, terms, scale, pattern.mask(grid))
    out = sa.sparse_attention(q, k, v, terms, scale, grid, pattern)
    assert rel_err(out, ref) < 1e-4
    # and it is really sparse: differs from dense attention
    assert rel_err(masked_einsum(q, k, v, terms, scale, None), ref) > 1e-2


def test_sparse_einsum_impl_and_cpu_training_fallback():
    grid = (8, 8, 8)
    q, k, v, terms, scale = random_qkv(grid)
    pattern = sa.SparsePattern(((2, 1), (0, 4)))
    ref = masked_einsum(q, k, v, terms, scale, pattern.mask(grid))
    assert sa.resolve_impl(pattern, q, grid) == "einsum"
    assert rel_err(sa.sparse_attention(q, k, v, terms, scale, grid, pattern), ref) < 1e-5
    v.requires_grad_(True)
    flex = sa.SparsePattern(pattern.branches, impl="flex")
    out = sa.sparse_attention(q, k, v, terms, scale, grid, flex)  # no CPU flex backward
    out.sum().backward()
    assert v.grad is not None and rel_err(out.detach(), ref) < 1e-5


def test_full_pattern_equals_dense():
    grid = (8, 8, 8)
    q, k, v, terms, scale = random_qkv(grid)
    full = sa.SparsePattern(((0, 1),), impl="flex")
    assert float(full.density(grid)) == 1.0
    assert (
        rel_err(
            sa.sparse_attention(q, k, v, terms, scale, grid, full),
            masked_einsum(q, k, v, terms, scale, None),
        )
        < 1e-4
    )


@pytest.mark.parametrize(
    "grid, branches",
    [
        ((8, 8, 8), ((4, 1), (8, 2), (16, 4))),
        ((16, 16, 16), ((4, 1), (8, 2), (16, 4))),
        ((8, 8, 8), ((2, 1), (0, 2), (0, 4))),
    ],
)
def test_grouped_flash_math_matches_masked_einsum(grid, branches):
    q, k, v, terms, scale = random_qkv(grid, b=2, heads=2, hd=16, seed=5)
    pattern = sa.SparsePattern(branches)
    ref = masked_einsum(q, k, v, terms, scale, pattern.mask(grid))
    out = sa.sparse_grouped(q, k, v, terms, scale, grid, pattern, sa.reference_group_kernel)
    assert rel_err(out, ref) < 1e-4


def test_grouped_flash_math_without_rel_pos_on_non_cubic_grid():
    grid = (8, 4, 8)
    q, k, v, _, scale = random_qkv(grid, rel_pos=False)
    pattern = sa.SparsePattern(((4, 1), (0, 2)))
    out = sa.sparse_grouped(q, k, v, None, scale, grid, pattern, sa.reference_group_kernel)
    assert rel_err(out, masked_einsum(q, k, v, None, scale, pattern.mask(grid))) < 1e-5


def test_flash_path_limits_are_explained():
    pattern = sa.SparsePattern()
    assert sa.flash_unsupported_reason(pattern, (16, 16, 16), 128) is None
    assert "divide" in sa.flash_unsupported_reason(pattern, (24, 24, 24), 128)
    assert "> 256" in sa.flash_unsupported_reason(pattern, (16, 16, 16), 240)
    if not sa.flash_available():
        grid = (8, 8, 8)
        q, k, v, terms, scale = random_qkv(grid)
        with pytest.raises(ImportError, match="flash_attn"):
            sa.sparse_attention(q, k, v, terms, scale, grid, sa.SparsePattern(impl="flash"))


# ----------------------------------------------------------------------------- the switch


def test_set_attention_backend_round_trip(parity_input, fastsam3d_fixture, einsum_embedding):
    model, x, dense = fastsam3d_fixture, parity_input, einsum_embedding
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        fastsam3d.set_attention_backend(model, "sparse")
        assert all(a.backend == "sparse" and a.sparse_pattern == sa.SparsePattern() for a in attns)
        sparse = model.image_encoder(x)
        # a pattern that keeps every key is dense attention again: the wiring passes the
        # same rel-pos terms to the sparse backend
        full = sa.SparsePattern(((0, 1),))
        fastsam3d.set_attention_backend(model, "sparse", pattern=full)
        assert all(a.sparse_pattern is full for a in attns)
        sparse_full = model.image_encoder(x)
        fastsam3d.set_attention_backend(model, "sdpa")
        assert all(a.backend == "sdpa" for a in attns)
        back = model.image_encoder(x)
    assert rel_err(sparse, dense) > 1e-3
    assert rel_err(sparse_full, dense) < 1e-4
    assert rel_err(back, dense) < 1e-4


def test_every_backend_is_in_the_dispatch_table_and_unknown_names_fail():
    torch.manual_seed(0)
    layer = Attention(32, 2, input_size=(4, 4, 4)).eval()
    for t in layer._tables():
        t.data.normal_(0, 0.3)
    x = torch.randn(1, 4, 4, 4, 32)
    outs = {}
    with torch.no_grad():
        for name in attention.BACKENDS:
            fastsam3d.set_attention_backend(layer, name, pattern=sa.SparsePattern(((0, 1),)))
            outs[name] = layer(x)
        layer.backend = "nope"
        with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
            layer(x)
    assert attention.BACKENDS == ("einsum", "sdpa", "fold", "flex", "sparse")
    for name, out in outs.items():
        assert rel_err(out, outs["einsum"]) < 1e-5, name
    with pytest.raises(ValueError, match="unknown attention backend"):
        fastsam3d.set_attention_backend(layer, "nope")


def test_sparse_is_an_experimental_subpackage_with_the_old_path_kept():
    from fastsam3d.modeling import sparse_attention as old

    assert sa.EXPERIMENTAL is True
    assert old.SparsePattern is sa.SparsePattern and old.sparse_attention is sa.sparse_attention
    assert set(old.__all__) == set(sa.__all__)
    assert fastsam3d.SparsePattern is sa.SparsePattern


# ----------------------------------------------------------------------------- CUDA (device run)

cuda = pytest.mark.gpu  # skipped without CUDA (Testing/conftest.py)


def on_cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


@cuda
@pytest.mark.parametrize("g", [8, 16])
def test_cuda_compiled_flex_paths_match_reference(g):
    grid = (g, g, g)
    q, k, v, terms, scale = random_qkv(grid, b=1, heads=6, hd=128, seed=g)
    q, k, v = on_cuda(q, k, v)
    terms = on_cuda(*terms)
    tol = 2e-3  # fp32 on CUDA: the Triton kernels may use TF32 dot products
    with torch.no_grad():
        dense = masked_einsum(q, k, v, terms, scale, None)
        assert rel_err(sa.flex_dense(q, k, v, terms, scale, grid), dense) < tol
        for kw in (
            {"impl": "flex"},
            {"impl": "flex_union"},
            {"impl": "flex", "flex_block": 64},
            {"impl": "auto"},
        ):
            pattern = sa.SparsePattern(**kw)
            ref = masked_einsum(q, k, v, terms, scale, pattern.mask(grid, q.device))
            out = sa.sparse_attention(q, k, v, terms, scale, grid, pattern)
            assert rel_err(out, ref) < tol, kw
            # bf16, as the fast path runs it
            lo = sa.sparse_attention(
                q.bfloat16(),
                k.bfloat16(),
                v.bfloat16(),
                tuple(t.bfloat16() for t in terms),
                scale,
                grid,
                pattern,
            )
            assert rel_err(lo.float(), ref) < 3e-2, kw


@cuda
def test_cuda_sparse_flex_gradients_match_reference():
    grid = (8, 8, 8)
    q, k, v, _, scale = random_qkv(grid, b=1, heads=2, hd=64, rel_pos=False)
    q, k, v = (t.cuda().requires_grad_(True) for t in (q, k, v))
    tables = tuple(
        (0.3 * torch.randn(15, 64, device="cuda")).requires_grad_(True) for _ in range(3)
    )
    pattern = sa.SparsePattern(impl="flex")
    grads = []
    for run in ("flex", "reference"):
        for t in (q, k, v, *tables):
            t.grad = None
        terms = rel_pos_terms(q, tables, grid, grid)
        if run == "flex":
            out = sa.sparse_attention(q, k, v, terms, scale, grid, pattern)
        else:
            out = masked_einsum(q, k, v, terms, scale, pattern.mask(grid, q.device))
        out.square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v, *tables)])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 5e-3


@cuda
@pytest.mark.skipif(not sa.flash_available(), reason="needs flash_attn")
def test_cuda_flash_path_matches_reference():
    grid = (16, 16, 16)
    q, k, v, terms, scale = random_qkv(grid, b=1, heads=6, hd=128, seed=7)
    q, k, v = on_cuda(q, k, v)
    terms = on_cuda(*terms)
    pattern = sa.SparsePattern(impl="flash")
    ref = masked_einsum(q, k, v, terms, scale, pattern.mask(grid, q.device))
    with torch.no_grad():
        out = sa.sparse_attention(q, k, v, terms, scale, grid, pattern)
    assert rel_err(out.float(), ref) < 3e-2  # flash runs bf16
