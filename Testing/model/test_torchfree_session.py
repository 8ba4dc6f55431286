"""The torch-free session: numpy resampling equals the PyTorch one, and a ``Session`` on numpy
(an ONNX Runtime runner, or the same network behind a numpy adapter) gives the PyTorch
session's masks over clicks, boxes, undo, reset and multi-crop objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from session_stubs import ThresholdModel, dice

from fastsam3d import geometry as tg
from fastsam3d import resample_numpy as ng
from fastsam3d.fastpath import Runner
from fastsam3d.lattice import Lattice
from fastsam3d.session import Session
from fastsam3d.volume import Volume

pytestmark = pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU")


def _affines(rng: np.random.Generator) -> list[np.ndarray]:
    """Storage orders users bring: RAS, LPS, permuted, anisotropic, slightly oblique."""
    out = []
    for perm, signs, spacing, angle in (
        ((0, 1, 2), (1, 1, 1), (1.0, 1.2, 2.0), 0.0),
        ((0, 1, 2), (-1, -1, 1), (0.75, 0.75, 3.0), 0.0),
        ((2, 0, 1), (1, -1, 1), (1.5, 1.1, 0.9), 0.0),
        ((1, 2, 0), (1, 1, -1), (2.0, 1.0, 1.3), 0.2),
    ):
        m = np.zeros((4, 4))
        for col, (row, sgn, sp) in enumerate(zip(perm, signs, spacing)):
            m[row, col] = sgn * sp
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        m[:3, :3] = rot @ m[:3, :3]
        m[:3, 3] = rng.uniform(-50, 50, 3)
        m[3, 3] = 1
        out.append(m)
    return out


def _cases():
    rng = np.random.default_rng(0)
    for m in _affines(rng):
        shape = tuple(int(n) for n in rng.integers(30, 70, 3))
        arr = rng.normal(50, 20, shape).astype(np.float32)
        arr[arr < 40] = 0  # a background the z-normalisation's x > 0 mask must see
        yield m, shape, arr


def test_numpy_resampling_equals_the_torch_resampling():
    """Crop sampling, z-normalisation, logits upsampling, mask prompts, paste-back: the numpy
    twin of every primitive gives PyTorch's values (bool outputs exactly)."""
    rng = np.random.default_rng(1)
    for m, shape, arr in _cases():
        lat = Lattice.for_volume(m, shape)
        vol_t, vol_n = torch.from_numpy(arr)[None, None], arr[None, None]
        for start in (lat.crop_start(m[:3, 3]), tuple(np.array(lat.shape) // 2 - 64)):
            a = tg.sample_crop(vol_t, lat, m, start).numpy()
            b = ng.sample_crop(vol_n, lat, m, start)
            assert np.allclose(a, b, atol=1e-4, rtol=1e-5)
            assert np.array_equal(a > 0, b > 0)
            za = tg.znormalize(torch.from_numpy(a)).numpy()
            assert np.allclose(za, ng.znormalize(b), atol=1e-4)
        low = rng.normal(0, 3, (1, 1, 32, 32, 32)).astype(np.float32)
        up_t = tg.upsample_logits(torch.from_numpy(low)).numpy()
        assert np.allclose(up_t, ng.upsample_logits(low), atol=1e-5)
        ops_t, ops_n = tg.TorchOps("cpu"), ng.NumpyOps()
        block = low[0, 0, 3:17, 5:9, 0:32]
        assert np.allclose(
            ops_t.upsample_block(torch.from_numpy(block)).numpy(),
            ops_n.upsample_block(block),
            atol=1e-5,
        )
        items = [(low, np.array([64.0, -10.0, 3.0])), (low * -1, np.array([5.0, 64.0, -127.0]))]
        prompt_t = ops_t.mask_prompt([(torch.from_numpy(x), o) for x, o in items]).numpy()
        assert np.allclose(prompt_t, ops_n.mask_prompt(items), atol=1e-5)
        region = tuple(slice(int(n) // 5, int(n) - 3) for n in shape)
        fstart = lat.crop_start(m[:3, 3])
        field = up_t[None]
        for mode in ("nearest", "linear"):
            src = (field > 0) if mode == "nearest" else field
            a = tg.sample_field(torch.from_numpy(src), fstart, lat, m, region, mode).numpy()
            b = ng.sample_field(src, fstart, lat, m, region, mode)
            assert a.shape == b.shape
            assert np.array_equal(a, b) if mode == "nearest" else np.allclose(a, b, atol=1e-5)
        starts = [fstart, tuple(np.array(fstart) + 40)]
        fa = tg.footprint(lat, m, region, starts, torch.device("cpu"))
        fb = ng.footprint(lat, m, region, starts)
        assert (fa is None) == (fb is None) and (fa is None or np.array_equal(fa.numpy(), fb))
        centre = m[:3, :3] @ (np.array(shape[::-1]) / 2) + m[:3, 3]
        lo, hi = centre - 7.5, centre + np.array([11.0, 4.0, 9.0])
        box_t = tg.ras_box_mask(m, region, lo, hi, torch.device("cpu")).numpy()
        assert box_t.any() and np.array_equal(box_t, ng.ras_box_mask(m, region, lo, hi))
        assert np.array_equal(ops_t.tile_weights().numpy(), ops_n.tile_weights())


def test_non_separable_fallbacks_agree():
    """A lattice oblique to the voxel axes (never built by for_volume) takes the general
    paths: numpy trilinear/nearest against PyTorch's grid_sample."""
    rng = np.random.default_rng(2)
    arr = rng.normal(10, 3, (20, 24, 28)).astype(np.float32)
    m = np.diag([1.0, 1.0, 1.0, 1.0])
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.eye(4)
    aff[:3, :3] = 1.5 * np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    lat = Lattice(aff, (40, 40, 40))
    start = (-20, -30, -10)
    a = tg.sample_crop(torch.from_numpy(arr)[None, None], lat, m, start, size=16).numpy()
    b = ng.sample_crop(arr[None, None], lat, m, start, size=16)
    assert np.allclose(a, b, atol=1e-4)
    region = (slice(2, 18), slice(0, 20), slice(5, 25))
    field = rng.normal(0, 1, (1, 30, 30, 30)).astype(np.float32)
    a = tg.sample_field(torch.from_numpy(field), (0, -5, 0), lat, m, region, "linear").numpy()
    assert np.allclose(a, ng.sample_field(field, (0, -5, 0), lat, m, region, "linear"), atol=1e-4)
    fa = tg.footprint(lat, m, region, [(-8, -3, 0)], torch.device("cpu"), size=12)
    assert np.array_equal(fa.numpy(), ng.footprint(lat, m, region, [(-8, -3, 0)], size=12))


class NumpyAdapter:
    """A torch Runner behind the torch-free runner interface (numpy in and out): the session's
    numpy path with exactly the PyTorch network, so only the resampling maths differs."""

    array_backend = "numpy"

    def __init__(self, runner: Runner) -> None:
        self.runner, self.device, self.model = runner, "cpu", runner.model
        self.calls = 0

    def encode(self, x: np.ndarray) -> np.ndarray:
        assert isinstance(x, np.ndarray)
        return self.runner.encode(torch.from_numpy(x)).numpy()

    def click(self, emb, pts, labels, mask):
        assert all(isinstance(a, np.ndarray) for a in (emb, pts, labels, mask))
        self.calls += 1
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in (emb, pts, labels, mask)]
        low, iou = self.runner.click(*args)
        return low.numpy(), iou.numpy()

    def warmup(self) -> None:
        self.runner.warmup()


def _two_balls() -> Volume:
    """Two bright balls 280 mm apart along S (more than one crop) on a faint ramp."""
    shape = (200, 40, 40)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    arr = np.zeros(shape, np.float32)
    for kc in (30, 170):
        arr[(i - 20) ** 2 + (j - 20) ** 2 + ((k - kc) * 2.0 / 1.5) ** 2 < 12**2] = 100
    return Volume(arr + 0.01 * i, np.diag([1.5, 1.5, 2.0, 1.0]))


def _long_rod() -> Volume:
    """A rod 300 mm long along S: propagation across crop faces (several crops)."""
    shape = (160, 36, 36)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    arr = np.where((i - 18) ** 2 + (j - 18) ** 2 < 36, 100.0, 0.0).astype(np.float32)
    return Volume(arr + 0.02 * j, np.diag([1.2, 1.2, 2.0, 1.0]))


def _script(vol: Volume) -> list[tuple]:
    ras = vol.ijk_to_ras_points
    n, c = vol.shape[0], vol.shape[2] // 2
    lo = ras([5, 5, int(n * 0.05)])
    hi = ras([c * 2 - 5, c * 2 - 5, int(n * 0.95)])
    return [
        ("point", ras([c, c, int(n * 0.15)]), True),
        ("point", ras([c, c, int(n * 0.85)]), True),  # outside every crop: a new crop
        ("point", ras([c + 4, c, int(n * 0.86)]), False),
        ("undo",),
        ("box", np.minimum(lo, hi), np.maximum(lo, hi)),  # tall box: several crops
        ("point", ras([c, c, n // 2]), True),
        ("reset",),
        ("point", ras([c, c + 1, int(n * 0.75)]), True),
    ]


def _play(session: Session, vol: Volume, steps: list[tuple]) -> list:
    session.set_volume(vol)
    out = []
    for step in steps:
        if step[0] == "point":
            r = session.add_point(step[1], step[2])
        elif step[0] == "box":
            r = session.add_box(step[1], step[2])
        else:
            r = getattr(session, step[0])()
        tiles = {s: np.asarray(t.logits) for s, t in session._state.tiles.items()}
        out.append((r, tiles))
    return out


def _compare(a: list, b: list, dice_min: float, logit_tol: float) -> None:
    for step, ((ra, ta), (rb, tb)) in enumerate(zip(a, b)):
        assert ra.region == rb.region and ra.crops == rb.crops, step
        assert dice(ra.full_mask(), rb.full_mask()) >= dice_min, step
        assert set(ta) == set(tb), step
        for s in ta:
            err = np.abs(ta[s] - tb[s]).max() / max(1.0, np.abs(ta[s]).max())
            assert err <= logit_tol, (step, s, err)


@pytest.mark.parametrize("make", [_two_balls, _long_rod])
def test_numpy_session_gives_the_torch_sessions_masks(make):
    vol = make()
    steps = _script(vol)
    runner = Runner(ThresholdModel(), "cpu", "fp32")
    kw = {"warmup": False, "max_crops": 6}
    ref = _play(Session(runner, **kw), vol, steps)
    adapter = NumpyAdapter(runner)
    ours = _play(Session(adapter, **kw), vol, steps)
    assert adapter.calls >= len(steps)  # every click went through the numpy runner
    assert sum(r.crops for r, _ in ref) > len(steps)  # multi-crop objects were exercised
    assert all(r.voxels for r, _ in ref[:3])
    _compare(ref, ours, 0.999, 1e-4)


def test_numpy_session_with_linear_paste_and_the_fixture_network():
    """The real network (fixture weights, FastSAM3D's 'newest' policy) and linear paste-back."""
    from fastsam3d.testing import fixture_model

    vol = _two_balls()
    runner = Runner(fixture_model("fastsam3d"), "cpu", "fp32")
    steps = _script(vol)[:4]
    kw = {"warmup": False, "max_crops": 3, "propagate": False, "paste_interpolation": "linear"}
    ref = _play(Session(runner, **kw), vol, steps)
    ours = _play(Session(NumpyAdapter(runner), **kw), vol, steps)
    assert any(r.voxels for r, _ in ref)
    _compare(ref, ours, 0.999, 1e-4)


# --- the ONNX Runtime runner (what `pip install fastsam3d[onnx]` runs) ----------------------
def _mni_volume() -> Volume:
    """nilearn's MNI152 T1 (a real head MR), 2 mm, as a Volume."""
    datasets = pytest.importorskip("nilearn.datasets")
    img = datasets.load_mni152_template(resolution=2)
    arr = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)  # [k, j, i]
    return Volume(np.ascontiguousarray(arr), img.affine)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from fastsam3d.checkpoint import save_official, save_safetensors
    from fastsam3d.testing import fixture_model

    root = tmp_path_factory.mktemp("weights")
    model = fixture_model("fastsam3d")
    return model, save_official(model, root / "w.pth"), save_safetensors(model, root / "w.st")


def test_onnx_runner_session_gives_the_torch_sessions_masks_on_a_real_volume(checkpoints, tmp_path):
    """.pth (restricted reader) and .safetensors -> filled templates -> ONNX Runtime fp32 ->
    a numpy Session: the PyTorch session's masks (Dice >= 0.999) and logits (1e-3) on MNI152."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fastsam3d.onnx import TORCH_FREE_SESSION, torch_free_runner

    assert TORCH_FREE_SESSION is True
    model, pth, st = checkpoints
    vol = _mni_volume()
    centre = vol.ijk_to_ras_points(np.array(vol.shape[::-1]) // 2)
    steps = [
        ("point", centre, True),
        ("point", centre + np.array([6.0, -4.0, 2.0]), True),
        ("point", centre + np.array([-8.0, 0.0, 0.0]), False),
        ("undo",),
        ("box", centre - 20, centre + 20),
        ("reset",),
    ]
    kw = {"warmup": False, "max_crops": 2, "propagate": False}
    ref = _play(Session(Runner(model, "cpu", "fp32"), **kw), vol, steps)
    assert sum(r.voxels for r, _ in ref) > 1000
    for path in (pth, st):
        runner = torch_free_runner(path, precision="fp32", cache_dir=tmp_path / path.name)
        assert runner.array_backend == "numpy" and runner.config == "fastsam3d"
        session = Session(runner, **kw)
        assert session.point_policy == "newest"  # the config's, read from the graphs' record
        _compare(ref, _play(session, vol, steps), 0.999, 1e-3)


def test_onnx_runner_refuses_what_it_cannot_run(tmp_path, checkpoints):
    pytest.importorskip("onnxruntime")
    from fastsam3d.onnx import torch_free_runner
    from fastsam3d.pth_reader import CheckpointReadError

    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(Exception, match="notes.pth"):
        torch_free_runner(bad)
    with pytest.raises(ValueError, match="bf16"):
        torch_free_runner(checkpoints[1], precision="bf16")
    from fastsam3d.checkpoint import save_official
    from fastsam3d.testing import fixture_model

    broken = fixture_model("fastsam3d", depth=1, embed_dim=48, num_heads=1, num_attn_free_blocks=1)
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointReadError, match="NaN"):
        torch_free_runner(save_official(broken, tmp_path / "nan.pth"))


_NO_TORCH_CLI = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, NoTorch())
from fastsam3d.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch was imported"
sys.exit(code)
"""


def test_segment_command_runs_on_onnxruntime_without_torch(checkpoints, tmp_path):
    """`fastsam3d segment` where torch cannot be imported: --backend auto picks ONNX Runtime
    and writes the PyTorch session's mask; asking for torch there says what to install."""
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    pytest.importorskip("nibabel")

    vol = _mni_volume()
    image = tmp_path / "mni.nii.gz"
    vol.write(image)
    centre = vol.ijk_to_ras_points(np.array(vol.shape[::-1]) // 2)
    point = ",".join(f"{x:g}" for x in centre)
    common = [str(image), "--point", point, "--checkpoint", str(checkpoints[1]), "-q"]
    common += ["--max-crops", "1"]
    env = {"FASTSAM3D_CACHE": str(tmp_path / "cache"), "FASTSAM3D_CPU_INT8": "0"}
    env = {**__import__("os").environ, **env}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_TORCH_CLI,
            "segment",
            *common,
            "--out",
            str(tmp_path / "o.nii.gz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ref = Session(Runner(checkpoints[0], "cpu", "fp32"), warmup=False, max_crops=1)
    ref.set_volume(Volume.read(image))
    a = ref.add_point(centre).full_mask()  # the command's session, in fp32 PyTorch
    b = Volume.read(tmp_path / "o.nii.gz").array > 0
    assert a.sum() > 1000 and dice(a, b) >= 0.999
    run = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CLI, "segment", *common, "--backend", "torch"]
        + ["--out", str(tmp_path / "x.nii.gz")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2 and "fastsam3d[torch]" in run.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_commands_that_need_torch_say_what_to_install(tmp_path):
    """Without torch, convert / export-onnx / bench ended on a bare "ModuleNotFoundError: No
    module named 'torch'", and segment --fixture-weights said "use --backend torch" with no
    torch to use: each now names the fastsam3d[torch] extra (exit 2, nothing written)."""
    import subprocess
    import sys

    image = tmp_path / "in.nii.gz"  # never read: the commands stop before any work
    cases = [
        ["convert", str(tmp_path / "x.pth"), str(tmp_path / "x.safetensors")],
        ["export-onnx", "--fixture-weights", str(tmp_path / "onnx")],
        ["bench", "--device", "cpu"],
        ["segment", str(image), "--point", "0,0,0", "--fixture-weights"]
        + ["--backend", "onnxruntime", "--out", str(tmp_path / "m.nii.gz")],
    ]
    for argv in cases:
        if argv[0] == "segment":
            pytest.importorskip("onnxruntime")
        run = subprocess.run(
            [sys.executable, "-c", _NO_TORCH_CLI, *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, (argv[0], run.stderr[-2000:])
        assert "fastsam3d[torch]" in run.stderr, (argv[0], run.stderr[-2000:])
        assert "ModuleNotFoundError" not in run.stderr, argv[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("oblique", [False, True], ids=["axis-aligned", "oblique"])
def test_numpy_session_on_a_real_oblique_volume(oblique):
    """MNI152 stored axis-aligned and rotated (0.35 rad about S, -0.2 about R): the numpy
    session's masks and logits are the PyTorch session's over a click, a correction, a box."""
    vol = _mni_volume()
    m = vol.ijk_to_ras.copy()
    if oblique:
        a, b = 0.35, -0.2
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        t = np.eye(4)
        t[:3, :3] = rz @ rx
        m = t @ m
    vol = Volume(vol.array, m)
    centre = vol.ijk_to_ras_points(np.array(vol.shape[::-1]) // 2)
    steps = [
        ("point", centre, True),
        ("point", centre + np.array([10.0, 5.0, 0.0]), False),
        ("box", centre - 40, centre + 40),
        ("undo",),
    ]
    runner = Runner(ThresholdModel(), "cpu", "fp32")
    kw = {"warmup": False, "max_crops": 4}
    ref = _play(Session(runner, **kw), vol, steps)
    assert all(r.voxels > 1000 for r, _ in ref)
    _compare(ref, _play(Session(NumpyAdapter(runner), **kw), vol, steps), 0.999, 1e-4)


def test_without_torch_or_onnxruntime_the_error_names_both_extras(monkeypatch, checkpoints):
    """No engine installed: Session, and fastsam3d names that need torch, say what to install."""
    import fastsam3d
    from fastsam3d import _optional, runners

    def no_torch(feature):
        raise ModuleNotFoundError(f"{feature} needs PyTorch: {_optional.TORCH_HINT}", name="torch")

    monkeypatch.setattr(runners, "require_torch", no_torch)
    monkeypatch.setattr(runners.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"fastsam3d\[torch\].*fastsam3d\[onnx\]"):
        Session(str(checkpoints[1]), warmup=False)

    def torchless_import(name, package=None):  # what importing fastsam3d.fastpath meets
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(fastsam3d, "import_module", torchless_import)
    with pytest.raises(ModuleNotFoundError, match=r"fastsam3d.Runner needs PyTorch.*\[torch\]"):
        fastsam3d.Runner  # noqa: B018
