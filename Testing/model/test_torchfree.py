"""Local inference without PyTorch: an official-layout .pth read by the restricted reader, the
packaged graph templates filled with its tensors, run by ONNX Runtime — equal to the reference
on the parity cases, in this process and in a fresh venv made by ``pip install fastsam3d[onnx]``,
which has no torch at all, where a Session segments like the PyTorch one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fastsam3d.checkpoint import save_official, save_safetensors  # noqa: E402
from fastsam3d.fastpath import Runner  # noqa: E402
from fastsam3d.onnx.build import build_from_weights, list_templates, match_template  # noqa: E402
from fastsam3d.onnx.engine import OrtEngine  # noqa: E402
from fastsam3d.pth_reader import read_weights  # noqa: E402
from fastsam3d.session import Session  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402
from fastsam3d.volume import Volume  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {  # parity key -> registry config
    "fastsam3d": "fastsam3d",
    "sammed3d": "sam-med3d-turbo",
    "sammed3d_fastsam3d_block": "sam-med3d-turbo-fastsam3d-block",
}

# Runs inside the torch-free venv (and, for the in-process test, here): argv = checkpoint,
# parity npz, work dir. Prints one line per check.
CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from fastsam3d.pth_reader import read_weights
    from fastsam3d.onnx.build import build_from_weights
    from fastsam3d.onnx.engine import OrtEngine

    ckpt, golden, work, key = sys.argv[1], np.load(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    obj = read_weights(ckpt)
    style = getattr(obj.get("args"), "block_style", None)
    out = build_from_weights(obj["model_state_dict"], work, style=style, int8=False)
    eng = OrtEngine(out, "fp32", threads=2)

    def rel(a, b):
        return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))

    emb = eng.encode(golden["input"])
    print("embedding", rel(emb, golden[key + "_embedding"]))
    zeros = np.zeros((1, 1, 32, 32, 32), np.float32)
    low, iou = eng.click(golden[key + "_embedding"], golden["points1"], golden["labels1"], zeros)
    print("click1", rel(low, golden[key + "_click1_lowres"]))
    low, _ = eng.click(golden[key + "_embedding"], golden["points3"], golden["labels3"],
                       golden[key + "_click1_lowres"], True)
    print("multimask", rel(low, golden[key + "_multimask_lowres"]))
    print("torch imported:", "torch" in sys.modules)
""")


def _parse(stdout: str) -> dict:
    return {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in stdout.splitlines()
        if line.strip()
    }


def _checkpoint(tmp_path: Path, config: str) -> Path:
    return save_official(fixture_model(config), tmp_path / f"{config}.pth")


def test_templates_cover_every_registered_config():
    assert set(list_templates()) == set(VARIANTS.values())


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_template_graphs_filled_from_a_pth_equal_the_reference(tmp_path, parity_dir, key):
    ckpt = _checkpoint(tmp_path, VARIANTS[key])
    obj = read_weights(ckpt)
    assert (
        match_template(obj["model_state_dict"], obj["args"].block_style)["config"] == VARIANTS[key]
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            str(ckpt),
            str(parity_dir / "parity.npz"),
            str(tmp_path / "g"),
            key,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = _parse(run.stdout)
    for check in ("embedding", "click1", "multimask"):
        assert float(res[check]) < 1e-4, (check, res)


def _template_weights(config: str) -> dict:
    """Arrays of the template's shapes that allocate nothing (matching reads shapes only)."""
    shapes = list_templates()[config]["shapes"]
    return {k: np.broadcast_to(np.float32(0), tuple(v)) for k, v in shapes.items()}


def test_registry_config_picks_the_block_style_the_file_does_not_record():
    """The official SAM-Med3D-turbo file records no block style, so without a config its
    weights run SAM-Med3D's own block; the registry entry sam-med3d-turbo-fastsam3d-block
    (the same file) must run FastSAM3D's block. Torch-free, that name used to run the wrong
    block: ``config`` was not passed (Session(name), segment --backend onnxruntime, Slicer)."""
    turbo = _template_weights("sam-med3d-turbo")
    assert match_template(turbo)["config"] == "sam-med3d-turbo"
    block = "sam-med3d-turbo-fastsam3d-block"
    assert match_template(turbo, config=block)["config"] == block
    assert match_template(turbo, "fastsam3d", config="sam-med3d-turbo")["config"] == (
        "sam-med3d-turbo"
    )
    with pytest.raises(ValueError, match="do not fit config 'fastsam3d'.*sam-med3d-turbo"):
        match_template(turbo, config="fastsam3d")


def test_registered_names_resolve_like_load_model_without_torch(tmp_path, monkeypatch):
    """Without torch, Session(name) took a file of that name in the working directory over the
    registered weights (load_model's rule is the reverse) and dropped the entry's config."""
    import torch

    from fastsam3d import hub, runners
    from fastsam3d.hashes import sha256_file
    from fastsam3d.weights import get_weights

    monkeypatch.setenv("FASTSAM3D_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    name = "sam-med3d-turbo-fastsam3d-block"
    cached = tmp_path / "cache" / get_weights(name).filename
    torch.save({"x": torch.zeros(1)}, cached)  # a PyTorch zip: what the cache accepts
    hub.download(name, sha256=sha256_file(cached), progress=False)  # adopted, pinned
    (tmp_path / name).write_bytes(b"not the registered weights")
    assert runners._checkpoint_file(name) == (str(cached), name)
    assert runners._checkpoint_file(tmp_path / name) == (str(tmp_path / name), None)


def test_template_build_refuses_weights_that_fit_no_graph(tmp_path):
    sd = {
        k: v.numpy()
        for k, v in fixture_model(
            "fastsam3d", depth=1, embed_dim=48, num_heads=1, num_attn_free_blocks=1
        )
        .state_dict()
        .items()
    }
    with pytest.raises(ValueError, match="fit none of the graph templates"):
        build_from_weights(sd, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_int8_from_template_agrees(tmp_path, parity_dir):
    obj = read_weights(_checkpoint(tmp_path, "fastsam3d"))
    out = build_from_weights(obj["model_state_dict"], tmp_path / "g", style="fastsam3d")
    golden = np.load(parity_dir / "parity.npz")
    e8 = OrtEngine(out, "int8", threads=2).encode(golden["input"])
    ref = golden["fastsam3d_embedding"]
    err = float(np.linalg.norm(e8 - ref) / np.linalg.norm(ref))
    assert 1e-4 < err < 0.05


def _pypi_reachable(python: str) -> bool:
    try:
        r = subprocess.run(
            [python, "-m", "pip", "index", "versions", "onnxruntime"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# Runs inside the torch-free venv: argv = .pth, .safetensors, volume npz, out dir. A Session on
# each file (through torch_free_runner, and Session(path) by itself), the masks saved; what
# needs torch must say which extra to install.
SESSION = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import fastsam3d
    from fastsam3d.onnx import TORCH_FREE_SESSION, torch_free_runner

    pth, st, vol_npz, out = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), Path(sys.argv[4])
    vol = fastsam3d.Volume(vol_npz["array"], vol_npz["affine"])
    centre = vol_npz["centre"]
    kw = dict(warmup=False, max_crops=2, propagate=False)
    for name, session in (
        ("pth", fastsam3d.Session(torch_free_runner(pth, precision="fp32"), **kw)),
        ("st", fastsam3d.Session(torch_free_runner(st, precision="fp32"), **kw)),
        ("auto", fastsam3d.Session(st, **kw)),  # no torch: ONNX Runtime, int8 encoder on CPUs
    ):
        session.set_volume(vol)
        a = session.add_point(centre).full_mask()
        b = session.add_point(centre + np.array([-8.0, 0.0, 0.0]), False).full_mask()
        u = session.undo().full_mask()
        np.savez(out / f"{name}.npz", a=a, b=b, u=u)
    try:
        fastsam3d.load_model(pth)
        hint = ""
    except ImportError as exc:
        hint = str(exc)
    print(json.dumps({"flag": TORCH_FREE_SESSION, "hint": hint, "auto": session.runner.precision,
                      "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}))
""")


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")
def test_session_in_a_venv_with_only_the_onnx_extra(tmp_path, parity_dir):
    """``pip install fastsam3d[onnx]`` (from this checkout, dependencies resolved by pip) into
    an isolated venv brings no torch; there a Session on a .pth and on a .safetensors file gives
    the PyTorch session's masks; the engine equals the reference; a malicious pickle is refused
    and runs nothing; what needs torch names the extra to install."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    py = str(env_dir / ("Scripts" if os.name == "nt" else "bin") / "python")
    if not _pypi_reachable(py):
        pytest.skip("the package index is unreachable: cannot build a torch-free venv")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FASTSAM3D_CACHE"] = str(tmp_path / "cache")
    src = tmp_path / "model"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(
        REPO / "model", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    # wheels come from pip's own cache (shared with the main venv's installs) where present
    r = subprocess.run([*pip, f"{src}[onnx]"], capture_output=True, text=True, timeout=500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = subprocess.run([py, "-c", "import torch"], capture_output=True, env=env)
    assert probe.returncode != 0, "fastsam3d[onnx] installed torch"
    model = fixture_model("fastsam3d")
    pth = save_official(model, tmp_path / "w.pth")
    st = save_safetensors(model, tmp_path / "w.safetensors")
    datasets = pytest.importorskip("nilearn.datasets")
    img = datasets.load_mni152_template(resolution=2)
    arr = np.ascontiguousarray(np.asarray(img.get_fdata(), np.float32).transpose(2, 1, 0))
    vol = Volume(arr, img.affine)
    centre = vol.ijk_to_ras_points(np.array(arr.shape[::-1]) // 2)
    np.savez(tmp_path / "vol.npz", array=arr, affine=img.affine, centre=centre)
    run = subprocess.run(
        [py, "-c", SESSION, str(pth), str(st), str(tmp_path / "vol.npz"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["flag"] is True and got["torch"] == [] and got["auto"] == "int8"
    assert "fastsam3d[torch]" in got["hint"] and "fastsam3d[onnx]" in got["hint"]
    ref = Session(Runner(model, "cpu", "fp32"), warmup=False, max_crops=2, propagate=False)
    ref.set_volume(vol)
    want = {
        "a": ref.add_point(centre).full_mask(),
        "b": ref.add_point(centre + np.array([-8.0, 0.0, 0.0]), False).full_mask(),
        "u": ref.undo().full_mask(),
    }
    assert want["a"].sum() > 1000
    for name, least in (("pth", 0.999), ("st", 0.999), ("auto", 0.99)):  # auto: int8 encoder
        masks = np.load(tmp_path / f"{name}.npz")
        for step, m in want.items():
            d = 2 * np.logical_and(m, masks[step]).sum() / (m.sum() + masks[step].sum())
            assert d >= least, (name, step, d)
    # the engine alone against the reference, and a malicious pickle, in the same venv
    run = subprocess.run(
        [
            py,
            "-c",
            CHECK,
            str(pth),
            str(parity_dir / "parity.npz"),
            str(tmp_path / "g"),
            "fastsam3d",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = _parse(run.stdout)
    assert res["torch imported:"] == "False"
    for check in ("embedding", "click1", "multimask"):
        assert float(res[check]) < 1e-4, (check, res)
    evil = tmp_path / "evil.pth"
    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "p": Exploit()}, evil)
    run = subprocess.run(
        [
            py,
            "-c",
            CHECK,
            str(evil),
            str(parity_dir / "parity.npz"),
            str(tmp_path / "g2"),
            "fastsam3d",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode != 0 and "refused" in run.stderr
    assert not (tmp_path / "pwned").exists()
