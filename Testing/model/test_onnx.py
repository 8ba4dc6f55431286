"""ONNX export, the ONNX Runtime engine and the int8 CPU path against the parity fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastsam3d import quantize  # noqa: E402
from fastsam3d.fastpath import Runner  # noqa: E402
from fastsam3d.onnx.engine import OrtEngine, default_providers  # noqa: E402
from fastsam3d.onnx.export import export_onnx  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402

CASES = {  # as in test_parity: case -> (points, labels, mask input, multimask)
    "click1": ("points1", "labels1", "zeros", False),
    "click3": ("points3", "labels3", "click1", False),
    "nomask": ("points1", "labels1", None, False),
    "multimask": ("points3", "labels3", "click1", True),
}
TINY = {"depth": 2, "embed_dim": 96, "num_heads": 2, "num_attn_free_blocks": 1}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def golden(parity_dir):
    return dict(np.load(parity_dir / "parity.npz"))


@pytest.fixture(scope="module")
def model():
    return fixture_model("fastsam3d")


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "fastsam3d")["encoder"].parent


@pytest.fixture(scope="module")
def exact(model):
    return Runner(model, "cpu", "fp32")


@pytest.fixture(scope="module")
def int8(model, exported):
    return Runner(model, "cpu", "int8", onnx_dir=exported)


def mask_for(golden: dict, which: str | None) -> np.ndarray | None:
    if which is None:
        return None
    if which == "zeros":
        return np.zeros((1, 1, 32, 32, 32), np.float32)
    return golden[f"fastsam3d_{which}_lowres"]


def test_ort_fp32_equals_the_reference_on_the_parity_cases(exported, golden):
    eng = OrtEngine(exported, "fp32", threads=2)
    assert eng.providers == {"encoder": "CPUExecutionProvider", "click": "CPUExecutionProvider"}
    assert rel(eng.encode(golden["input"]), golden["fastsam3d_embedding"]) < 1e-4
    for case, (pts, labels, mask, multi) in CASES.items():
        low, iou = eng.click(
            golden["fastsam3d_embedding"],
            golden[pts],
            golden[labels],
            mask_for(golden, mask),
            multi,
        )
        assert low.shape == golden[f"fastsam3d_{case}_lowres"].shape, case
        assert rel(low, golden[f"fastsam3d_{case}_lowres"]) < 1e-4, case
        assert rel(iou, golden[f"fastsam3d_{case}_iou"]) < 1e-4, case


def test_runner_onnxruntime_backend_matches_the_torch_runner(model, exported, golden, exact):
    ort_run = Runner(model, "cpu", backend="onnxruntime", precision="fp32", onnx_dir=exported)
    x = torch.from_numpy(golden["input"])
    e_ort, e_pt = ort_run.encode(x), exact.encode(x)
    assert ort_run.precision == "fp32" and e_ort.dtype == torch.float32
    assert rel(e_ort.numpy(), e_pt.numpy().astype(np.float64)) < 1e-4
    c, lab = torch.from_numpy(golden["points3"]), torch.from_numpy(golden["labels3"])
    m = torch.from_numpy(golden["fastsam3d_click1_lowres"])
    for mask, multi in ((m, False), (None, False), (m, True)):
        a, ia = ort_run.click(e_pt, c, lab, mask, multi)
        b, ib = exact.click(e_pt, c, lab, mask, multi)
        assert a.shape == b.shape and ia.shape == ib.shape
        assert rel(a.numpy(), b.numpy().astype(np.float64)) < 1e-4


@pytest.mark.parametrize("pts,labels", [("points1", "labels1"), ("points3", "labels3")])
def test_int8_masks_agree_with_fp32_and_fp32_stays_exact(golden, int8, exact, pts, labels):
    assert int8.precision == "int8" and int8.backend == "torch"
    x = torch.from_numpy(golden["input"])
    e8, e32 = int8.encode(x), exact.encode(x)
    assert rel(e32.numpy(), golden["fastsam3d_embedding"]) < 1e-4  # fp32 untouched
    emb_err = rel(e8.numpy(), e32.numpy().astype(np.float64))
    assert 1e-4 < emb_err < 0.05  # really quantised, and close
    c, lab = torch.from_numpy(golden[pts]), torch.from_numpy(golden[labels])
    zeros = torch.zeros(1, 1, 32, 32, 32)
    a, _ = exact.click(e32, c, lab, zeros)
    b, _ = int8.click(e8, c, lab, zeros)
    logit_err = float((a - b).norm() / a.norm())
    big = [F.interpolate(t, size=128, mode="trilinear") > 0 for t in (a, b)]
    print(
        f"int8 {pts}: embedding rel err {emb_err:.2e}, logits rel err {logit_err:.2e}, "
        f"Dice {dice(*big):.4f}"
    )
    assert logit_err < 5e-2
    assert dice(*big) >= 0.99


def test_int8_agrees_on_a_real_mr_crop(int8, exact):
    """A crop of nilearn's MNI152 T1 (a real head MR), z-normalised as the session does."""
    datasets = pytest.importorskip("nilearn.datasets")
    from fastsam3d import geometry as geo

    img = datasets.load_mni152_template(resolution=1)
    arr = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)  # [k, j, i]
    vol = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    lattice = geo.Lattice.for_volume(img.affine, arr.shape)
    centre = img.affine[:3, :3] @ (np.array(arr.shape[::-1]) / 2) + img.affine[:3, 3]
    start = lattice.crop_start(centre)
    x = geo.znormalize(geo.sample_crop(vol, lattice, img.affine, start))[None, None]
    e8, e32 = int8.encode(x), exact.encode(x)
    c = torch.tensor([[[64.0, 64.0, 64.0]]])
    lab = torch.ones(1, 1, dtype=torch.long)
    a, _ = exact.click(e32, c, lab, torch.zeros(1, 1, 32, 32, 32))
    b, _ = int8.click(e8, c, lab, torch.zeros(1, 1, 32, 32, 32))
    big = [F.interpolate(t, size=128, mode="trilinear") > 0 for t in (a, b)]
    assert big[0].sum() > 1000
    assert dice(*big) >= 0.99


def test_export_reuses_matching_graphs_and_refuses_other_weights(exported):
    meta = json.loads((exported / "fastsam3d-onnx.json").read_text(encoding="utf-8"))
    assert meta["config"] == "fastsam3d" and meta["point_policy"] == "newest"
    before = {p.name: p.stat().st_mtime_ns for p in exported.glob("*.onnx")}
    export_onnx(fixture_model("fastsam3d"), exported)  # same weights: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in exported.glob("*.onnx")} == before
    other = fixture_model("fastsam3d", **TINY)
    with pytest.raises(FileExistsError, match="other weights"):
        export_onnx(other, exported)
    assert {p.name: p.stat().st_mtime_ns for p in exported.glob("*.onnx")} == before


@pytest.fixture(scope="module")
def tiny_cli_export(tmp_path_factory):
    """A tiny network's checkpoint exported through ``fastsam3d export-onnx`` (one export
    shared by the command test and the automatic-choice test)."""
    from fastsam3d.checkpoint import load_model, save_official
    from fastsam3d.cli import main

    root = tmp_path_factory.mktemp("cli")
    ckpt = save_official(fixture_model("fastsam3d", **TINY), root / "tiny.pth")
    out = root / "out"
    code = main(["export-onnx", str(ckpt), str(out)])
    return code, out, load_model(ckpt)


def test_auto_picks_int8_only_without_native_bf16(monkeypatch, tiny_cli_export):
    import fastsam3d.fastpath as fp

    _, out, tiny = tiny_cli_export
    monkeypatch.setattr(quantize, "onnx_dir_for", lambda model, root=None: out)
    monkeypatch.setattr(fp, "cpu_has_fast_bf16", lambda: True)
    assert Runner(tiny, "cpu").precision == "bf16"
    monkeypatch.setattr(fp, "cpu_has_fast_bf16", lambda: False)
    r = Runner(tiny, "cpu")
    assert (r.precision, r.backend) == ("int8", "torch")
    assert r.encode(torch.zeros(1, 1, 128, 128, 128)).shape == (1, 384, 8, 8, 8)
    monkeypatch.setenv("FASTSAM3D_CPU_INT8", "0")
    assert Runner(tiny, "cpu").precision == "fp32"
    monkeypatch.setenv("FASTSAM3D_CPU_INT8", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(quantize, "prepare_onnx", broken)
    r = Runner(tiny, "cpu")  # an automatic choice falls back ...
    assert (r.precision, r.backend) == ("fp32", "torch")
    with pytest.raises(RuntimeError, match="exporter broke"):
        Runner(tiny, "cpu", "int8")  # ... an explicit one does not


def test_engine_errors_are_clear(tmp_path, exported, monkeypatch):
    with pytest.raises(FileNotFoundError, match="export-onnx"):
        OrtEngine(tmp_path)
    with pytest.raises(ValueError, match="precision"):
        OrtEngine(exported, "bf16")
    eng = OrtEngine(exported, "fp32", threads=1)
    with pytest.raises(ValueError, match="crops must be"):
        eng.encode(np.zeros((1, 1, 64, 64, 64), np.float32))
    monkeypatch.setenv("FASTSAM3D_ORT_PROVIDERS", "NoSuchExecutionProvider")
    with pytest.raises(RuntimeError, match="not offered"):
        default_providers()
    monkeypatch.delenv("FASTSAM3D_ORT_PROVIDERS")
    with pytest.raises(ValueError, match="bf16 is a PyTorch path"):
        Runner(fixture_model("fastsam3d", **TINY), "cpu", "bf16", backend="onnxruntime")


def test_export_onnx_command(tmp_path, capsys, tiny_cli_export):
    from fastsam3d.cli import main

    code, out, _ = tiny_cli_export
    assert code == 0
    for name in ("encoder.onnx", "click.onnx", "encoder.int8.onnx", "fastsam3d-onnx.json"):
        assert (out / name).exists(), name
    assert main(["export-onnx", str(tmp_path / "missing.pth"), str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastsam3d export-onnx:") and "missing.pth" in err
    assert not (tmp_path / "o2").exists()


def test_template_for_weights_of_two_configs_is_the_registered_one_unless_a_style_is_recorded():
    """SAM-Med3D's 12-block weights fit its own template and its FastSAM3D-block variant's: with
    no recorded block style the config registered first (the one the weights were trained as)
    wins; a recorded style picks the variant."""
    import numpy as np

    from fastsam3d.onnx.build import list_templates, match_template

    shapes = list_templates()["sam-med3d-turbo"]["shapes"]
    weights = {k: np.zeros(tuple(v), np.float32) for k, v in shapes.items()}
    assert match_template(weights)["config"] == "sam-med3d-turbo"
    assert match_template(weights, "fastsam3d")["config"] == "sam-med3d-turbo-fastsam3d-block"
    assert match_template(weights, "standard")["config"] == "sam-med3d-turbo"
