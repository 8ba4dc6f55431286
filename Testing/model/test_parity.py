"""Golden outputs of the public reference networks, reproduced from the weight recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastsam3d
from fastsam3d.testing import fixture_model, recipe_tensor

VARIANTS = {
    "fastsam3d": "fastsam3d",
    "sammed3d": "sam-med3d-turbo",
    "sammed3d_fastsam3d_block": "sam-med3d-turbo-fastsam3d-block",
}
KEY_GROUPS = {
    "fastsam3d": ("fastsam3d_encoder", "prompt_encoder", "mask_decoder"),
    "sam-med3d-turbo": ("sammed3d_encoder", "prompt_encoder", "mask_decoder"),
}
CASES = {  # case -> (points, labels, mask input, multimask)
    "click1": ("points1", "labels1", "zeros", False),
    "click3": ("points3", "labels3", "click1", False),
    "nomask": ("points1", "labels1", None, False),
    "multimask": ("points3", "labels3", "click1", True),
}


def rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    a = a.detach().numpy().astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def golden(parity_dir):
    return dict(np.load(parity_dir / "parity.npz"))


@pytest.fixture(scope="module")
def keys(parity_dir):
    return json.loads((parity_dir / "keys.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def models():
    return {name: fixture_model(name) for name in VARIANTS.values()}


@pytest.mark.parametrize("model_name", sorted(KEY_GROUPS))
def test_state_dict_keys_and_shapes_are_official(model_name, keys):
    expected = {}
    for group in KEY_GROUPS[model_name]:
        expected.update(keys["shapes"][group])
    own = fastsam3d.build_model(model_name).state_dict()
    assert list(own) == list(expected), "key names or order differ from the official ones"
    assert {k: list(v.shape) for k, v in own.items()} == expected


def test_recipe_rebuilds_the_fixture_weights(keys):
    for group, sums in keys["recipe_sums"].items():
        for name, total in sums.items():
            shape = keys["shapes"][group][name]
            got = float(recipe_tensor(name, shape).double().sum())
            assert got == pytest.approx(total, rel=1e-9, abs=1e-9), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_matches_reference(variant, golden, models):
    model = models[VARIANTS[variant]]
    with torch.no_grad():
        emb = model.image_encoder(torch.from_numpy(golden["input"]))
    assert emb.shape == (1, 384, 8, 8, 8)
    assert rel_err(emb, golden[f"{variant}_embedding"]) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_matches_reference(variant, case, golden, models):
    model = models[VARIANTS[variant]]
    pts, labels, mask, multi = CASES[case]
    if mask == "zeros":
        mask_in = torch.zeros(1, 1, 32, 32, 32)
    elif mask == "click1":
        mask_in = torch.from_numpy(golden[f"{variant}_click1_lowres"])
    else:
        mask_in = None
    with torch.no_grad():
        low_res, iou = model.predict(
            torch.from_numpy(golden[f"{variant}_embedding"]),
            torch.from_numpy(golden[pts]),
            torch.from_numpy(golden[labels]),
            mask_in,
            multimask_output=multi,
        )
    assert low_res.shape == golden[f"{variant}_{case}_lowres"].shape
    assert rel_err(low_res, golden[f"{variant}_{case}_lowres"]) < 1e-4
    assert rel_err(iou, golden[f"{variant}_{case}_iou"]) < 1e-4


def test_einsum_reference_backend_agrees_with_default(golden, models):
    """The default (SDPA, closed-form padded windows) equals the plain einsum reference that
    materialises SAM-Med3D's 14^3 padded windows like the public code."""
    model = models["sam-med3d-turbo"]
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        fast = model.image_encoder(x)
        fastsam3d.set_attention_backend(model, "einsum")
        try:
            ref = model.image_encoder(x)
        finally:
            fastsam3d.set_attention_backend(model, "sdpa")
    assert rel_err(fast, ref.numpy()) < 1e-4


@pytest.mark.parametrize("variant", ["fastsam3d", "sammed3d"])
def test_fold_backend_is_exact(variant, golden, models):
    """The rel-pos bias folded into extra q/k dims (no additive mask) gives the same numbers."""
    model = models[VARIANTS[variant]]
    fastsam3d.set_attention_backend(model, "fold")
    try:
        with torch.no_grad():
            emb = model.image_encoder(torch.from_numpy(golden["input"]))
    finally:
        fastsam3d.set_attention_backend(model, "sdpa")
    assert rel_err(emb, golden[f"{variant}_embedding"]) < 1e-4


def test_encoder_taps_expose_every_block(golden, models):
    model = models["fastsam3d"]
    with torch.no_grad():
        emb, taps = model.image_encoder(torch.from_numpy(golden["input"]), return_taps=True)
    assert len(taps) == 6 and all(t.shape == (1, 8, 8, 8, 768) for t in taps)
    assert rel_err(emb, golden["fastsam3d_embedding"]) < 1e-4
