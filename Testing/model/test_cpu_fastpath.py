"""The CPU fast path (bf16 encoder) keeps the masks of the exact fp32 path on the parity cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsam3d.device import resolve_device
from fastsam3d.fastpath import Runner
from fastsam3d.testing import fixture_model


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("name", ["fastsam3d", "sam-med3d-turbo"])
def test_bf16_encoder_masks_agree_with_fp32(name, parity_dir):
    golden = np.load(parity_dir / "parity.npz")
    x = torch.from_numpy(golden["input"])
    model = fixture_model(name)
    exact, fast = Runner(model, "cpu", "fp32"), Runner(model, "cpu", "bf16")
    assert fast.click_precision == "fp32"  # auto: the fp32 click is the faster one on a CPU
    bf16_click = Runner(model, "cpu", "bf16", click_precision="bf16")
    e32, e16 = exact.encode(x), fast.encode(x)
    assert e16.dtype == torch.float32
    for pts, labels in (("points1", "labels1"), ("points3", "labels3")):
        c, lab = torch.from_numpy(golden[pts]), torch.from_numpy(golden[labels])
        zeros = torch.zeros(1, 1, 32, 32, 32)
        a, _ = exact.click(e32, c, lab, zeros)
        for runner in (fast, bf16_click):
            b, _ = runner.click(e16, c, lab, zeros)
            assert b.dtype == torch.float32
            assert float((a - b).norm() / a.norm()) < 2e-2
            big = [F.interpolate(t, size=128, mode="trilinear") > 0 for t in (a, b)]
            assert dice(*big) >= 0.99


def test_exact_runner_is_the_parity_path(parity_dir):
    golden = np.load(parity_dir / "parity.npz")
    emb = Runner(fixture_model("fastsam3d"), "cpu", "fp32").encode(
        torch.from_numpy(golden["input"])
    )
    ref = golden["fastsam3d_embedding"]
    assert np.linalg.norm(emb.numpy() - ref) / np.linalg.norm(ref) < 1e-4


def test_device_resolution_is_explicit():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="precision"):
        Runner(fixture_model("fastsam3d", depth=2, num_attn_free_blocks=2), "cpu", "fp16")
