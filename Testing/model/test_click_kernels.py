"""The click's exact rewrites (folded cross attention, upscaling as GEMMs) equal the plain
forms they replace: same sums in another order, so within fp32 rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsam3d.modeling.common import reference_kernels
from fastsam3d.modeling.mask_decoder import MaskDecoder3D
from fastsam3d.modeling.transformer import Attention
from fastsam3d.testing import fixture_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def plain(model: nn.Module, on: bool) -> None:
    """Switch the rewrites off (on=True) or back on, as the ONNX export does."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fold = not on
        if isinstance(m, MaskDecoder3D):
            m.gemm_upscaling = not on


@pytest.mark.parametrize("short_side", ["queries", "keys"])
def test_folded_attention_equals_the_plain_form(short_side):
    torch.manual_seed(0)
    att = Attention(384, 8, downsample_rate=2).eval()
    for p in att.parameters():  # non-zero biases: folding moves them, so they must count
        nn.init.normal_(p, std=0.05)
    few, many = torch.randn(2, 7, 384), torch.randn(2, 512, 384)
    many_v = torch.randn(2, 512, 384)
    if short_side == "queries":
        args = (few, many, many_v)
        fold = att._few_queries
    else:
        args = (many, few, torch.randn(2, 7, 384))
        fold = att._few_keys
    with torch.inference_mode():
        ref = att._plain(*args)
        assert rel(fold(*args), ref) < 1e-5
        assert rel(att(*args), ref) < 1e-5  # forward picks the folded form here


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_folded_attention_runs_in_the_module_dtype(dtype):
    """A decoder cast whole to bf16 (no autocast) still runs: the fp32 softmax is cast back."""
    torch.manual_seed(0)
    att = Attention(384, 8, downsample_rate=2).eval().to(dtype)
    few, many = torch.randn(1, 7, 384, dtype=dtype), torch.randn(1, 512, 384, dtype=dtype)
    with torch.inference_mode():
        for args in ((few, many, many), (many, few, few)):
            out, ref = att(*args), att._plain(*args)
            assert out.dtype == dtype and rel(out.float(), ref.float()) < 3e-2


def test_attention_folds_only_where_it_saves_work(monkeypatch):
    att = Attention(384, 8, downsample_rate=2).eval()

    def boom(*args: object) -> None:
        raise AssertionError("folded")

    monkeypatch.setattr(att, "_few_queries", boom)
    monkeypatch.setattr(att, "_few_keys", boom)
    with torch.inference_mode():
        att(torch.randn(1, 7, 384), torch.randn(1, 7, 384), torch.randn(1, 7, 384))  # self
        att(torch.randn(1, 13, 384), torch.randn(1, 512, 384), torch.randn(1, 512, 384))
        with reference_kernels():  # the public code's way, for the benchmark's reference
            att(torch.randn(1, 7, 384), torch.randn(1, 512, 384), torch.randn(1, 512, 384))
        att.fold = False  # the ONNX export's setting
        att(torch.randn(1, 7, 384), torch.randn(1, 512, 384), torch.randn(1, 512, 384))
        att.fold = True
        with pytest.raises(AssertionError, match="folded"):
            att(torch.randn(1, 7, 384), torch.randn(1, 512, 384), torch.randn(1, 512, 384))


def test_gemm_upscaling_equals_the_transposed_convolutions():
    torch.manual_seed(1)
    dec = MaskDecoder3D().eval()
    for m in dec.output_upscaling:
        for p in m.parameters():
            nn.init.normal_(p, std=0.1)
    src, hyper = torch.randn(2, 512, 384), torch.randn(2, 3, 48)
    with torch.inference_mode():
        up = dec.output_upscaling(src.transpose(1, 2).reshape(2, 384, 8, 8, 8))
        ref = (hyper @ up.reshape(2, 48, -1)).reshape(2, 3, 32, 32, 32)
        got = dec._masks_by_gemm(src, hyper, (8, 8, 8))
    assert got.shape == ref.shape
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize(
    "points,mask,multimask,batch",
    [(1, True, False, 1), (3, False, True, 1), (2, True, True, 2), (20, True, False, 1)],
)
def test_click_with_rewrites_equals_the_plain_click(points, mask, multimask, batch):
    model = fixture_model("fastsam3d")
    g = torch.Generator().manual_seed(points)
    emb = torch.randn(batch, 384, 8, 8, 8, generator=g)
    coords = torch.rand(batch, points, 3, generator=g) * 127
    labels = torch.randint(0, 2, (batch, points), generator=g)
    prompt = torch.randn(batch, 1, 32, 32, 32, generator=g) if mask else None
    with torch.inference_mode():
        low, iou = model.predict(emb, coords, labels, prompt, multimask)
        plain(model, True)
        try:
            low0, iou0 = model.predict(emb, coords, labels, prompt, multimask)
        finally:
            plain(model, False)
    assert low.shape == low0.shape == (batch, 3 if multimask else 1, 32, 32, 32)
    assert rel(low, low0) < 1e-5 and rel(iou, iou0) < 1e-5
    assert torch.equal(low > 0, low0 > 0) or float(((low > 0) != (low0 > 0)).float().mean()) < 1e-4


def test_the_rewrites_run_on_the_cpu_only(monkeypatch):
    """CUDA keeps the plain forms: on an H200 the rewrites made the click slower (0.76 -> 0.94
    ms, bench_h200_2026-11-30.json). The meta device stands in for a GPU's."""
    from fastsam3d.modeling import mask_decoder as md
    from fastsam3d.modeling import transformer as tr
    from fastsam3d.modeling.common import click_rewrites

    assert click_rewrites(torch.empty(1))
    assert not click_rewrites(torch.empty(1, device="meta"))
    with reference_kernels():
        assert not click_rewrites(torch.empty(1))

    def boom(*args: object) -> None:
        raise AssertionError("rewritten")

    model = fixture_model("fastsam3d").eval()
    for m in model.modules():
        if isinstance(m, Attention):
            monkeypatch.setattr(m, "_few_queries", boom)
            monkeypatch.setattr(m, "_few_keys", boom)
    monkeypatch.setattr(model.mask_decoder, "_masks_by_gemm", boom)
    args = dict(
        image_embeddings=torch.randn(1, 384, 8, 8, 8),
        image_pe=torch.randn(1, 384, 8, 8, 8),
        sparse_prompt_embeddings=torch.randn(1, 3, 384),
        dense_prompt_embeddings=torch.randn(1, 384, 8, 8, 8),
        multimask_output=False,
    )

    def as_if_on_a_gpu(x: torch.Tensor) -> bool:  # what click_rewrites says off the CPU
        return click_rewrites(torch.empty(1, device="meta"))

    with torch.inference_mode():
        monkeypatch.setattr(tr, "click_rewrites", as_if_on_a_gpu)
        monkeypatch.setattr(md, "click_rewrites", as_if_on_a_gpu)
        low_res, _ = model.mask_decoder(**args)  # every plain form: no AssertionError
        assert tuple(low_res.shape) == (1, 1, 32, 32, 32)
        monkeypatch.setattr(tr, "click_rewrites", click_rewrites)
        monkeypatch.setattr(md, "click_rewrites", click_rewrites)
        with pytest.raises(AssertionError, match="rewritten"):
            model.mask_decoder(**args)
