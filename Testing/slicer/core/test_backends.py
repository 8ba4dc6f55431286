"""The module's backends (FastSAM3DSlicerLib/backends.py): local PyTorch, ONNX Runtime, remote.

A loopback ``fastsam3d serve`` with the tiny fixture network (the serve tests' helper) stands
in for a GPU server: a click through the Lib's InteractiveLogic on it writes the same voxels
as the local engine; the remote and the ONNX Runtime paths import no torch (subprocesses with
torch blocked; the ONNX one writes the PyTorch engine's voxels); the
connection test names what is wrong; the settings keep the API key out of QSettings unless
"remember" is ticked; the install step asks each backend for its own packages only.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import types

import numpy as np
import pytest
from slicer_scene import REPO, build_scene

pytest.importorskip("torch")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(REPO / "Testing" / "model"))
sys.path.insert(0, str(REPO / "Testing" / "slicer" / "module"))

from test_interaction_widget import QE, FakeSettings, env, run_event_loop, send  # noqa: E402,F401
from test_serve import KEY, serving  # noqa: E402
from test_slicer_install import Host  # noqa: E402

import fastsam3d  # noqa: E402
from fastsam3d.bench import TINY  # noqa: E402
from fastsam3d.fastpath import Runner  # noqa: E402
from fastsam3d.remote import RemoteSession  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402
from FastSAM3DSlicerLib import backends, deps, install  # noqa: E402
from FastSAM3DSlicerLib.engine import FastSAM3DEngine  # noqa: E402
from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU"),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def runner():
    return Runner(fixture_model("fastsam3d", **TINY), "cpu")


@pytest.fixture(scope="module")
def srv(runner):
    with serving(runner, api_key=KEY, max_sessions=8, max_upload_mb=16, warmup=True) as s:
        yield s


@pytest.fixture(scope="module")
def local_engine():
    return FastSAM3DEngine.from_model(fixture_model("fastsam3d", **TINY), "cpu", propagate=False)


def remote_settings(srv, **kw) -> backends.BackendSettings:
    return backends.BackendSettings(kind=backends.REMOTE, url=srv.url, api_key=KEY, **kw)


def click(engine, ijk=(20, 18, 22)):
    """One point through InteractiveLogic on a fresh scene; the target segment after it."""
    scene = build_scene()
    logic = InteractiveLogic(engine)
    try:
        logic.set_target(scene.volume, scene.segmentation, scene.target)
        logic.add_point(scene.world_of_ijk(ijk), True)
        (record,) = logic.wait()
        assert not isinstance(record, FailedEdit), record
        after = scene.segment(scene.target)
        logic.undo()
        undone = scene.segment(scene.target)
    finally:
        logic.close()
    return after, undone


def test_remote_click_writes_the_same_voxels_as_the_local_engine(srv, local_engine):
    remote = backends.build_engine(remote_settings(srv), propagate=False)
    assert remote.device == "cpu" and "remote" in remote.device_info.description
    try:
        after_remote, undone_remote = click(remote)
        after_local, undone_local = click(local_engine)
        assert after_local.any(), "empty fixture mask: the comparison would be vacuous"
        np.testing.assert_array_equal(after_remote, after_local)
        assert not undone_remote.any() and not undone_local.any()
        assert srv.app.state.manager.stats()["sessions"] >= 1
    finally:
        remote.close()
    assert srv.app.state.manager.stats()["sessions"] == 0  # close() freed the server's copy


def test_remote_path_imports_no_torch(srv):
    """The Lib + the remote engine + a click, in a Python where torch cannot be imported."""
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        sys.path[:0] = [{str(REPO / "Testing" / "slicer" / "core")!r},
                        {str(REPO / "FastSAM3DSlicer")!r}]
        from slicer_scene import build_scene
        from FastSAM3DSlicerLib import backends
        from FastSAM3DSlicerLib.logic import InteractiveLogic

        settings = backends.BackendSettings(kind="remote", url={srv.url!r}, api_key={KEY!r})
        missing = [r.name for r in backends.requirements("remote")]
        engine = backends.build_engine(settings, propagate=False)
        scene = build_scene()
        logic = InteractiveLogic(engine)
        logic.set_target(scene.volume, scene.segmentation, scene.target)
        logic.add_point(scene.world_of_ijk((20, 18, 22)), True)
        (record,) = logic.wait()
        voxels = int(scene.segment(scene.target).sum())
        logic.close()
        engine.close()
        try:
            import torch  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        mods = sorted(sys.modules)
        print(json.dumps({{"voxels": voxels, "blocked": blocked, "requirements": missing,
                          "torch": [m for m in mods if m.split(".")[0] == "torch"],
                          "fastsam3d": [m for m in mods if m.startswith("fastsam3d")]}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=str(REPO)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["blocked"], "the torch blocker did not work: the test would prove nothing"
    assert got["torch"] == []
    assert got["voxels"] > 0
    assert "fastsam3d.remote" in got["fastsam3d"]
    assert "torch" not in got["requirements"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NotOurs(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"<html>hello</html>" if self.path == "/readyz" else b"nope"
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_connection_test_names_what_is_wrong(srv, monkeypatch):
    ok = backends.check_connection(srv.url, KEY)
    assert ok.ok and ok.message.startswith("connected: ") and "on cpu" in ok.message
    assert ok.info["model"] and ok.info["version"] == fastsam3d.__version__

    wrong = backends.check_connection(srv.url, "not-the-key-0123456789")
    assert not wrong.ok and wrong.message.startswith("wrong API key")
    assert "not-the-key" not in wrong.message
    none = backends.check_connection(srv.url, "")
    assert not none.ok and "needs an API key" in none.message

    down = backends.check_connection(f"http://127.0.0.1:{_free_port()}", KEY)
    assert not down.ok and down.message.startswith("unreachable")
    for bad in ("", "ftp://host/x", "http://host:port"):
        report = backends.check_connection(bad, KEY)
        assert not report.ok and ("URL" in report.message or "url" in report.message)

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotOurs)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        report = backends.check_connection(url, KEY)
        assert not report.ok and "not a fastsam3d server" in report.message
    finally:
        other.shutdown()
        other.server_close()

    monkeypatch.setattr(fastsam3d, "__version__", "0.9.0")
    old = backends.check_connection(srv.url.replace("http://", ""), KEY)  # scheme optional
    assert not old.ok and old.message.startswith("version mismatch")
    assert "0.9.0" in old.message
    with pytest.raises(backends.BackendError, match="version mismatch"):
        backends.build_engine(remote_settings(srv))


def test_a_full_server_is_said_so(runner):
    with serving(runner, api_key=KEY, max_sessions=1) as s:
        with RemoteSession(s.url, KEY):
            report = backends.check_connection(s.url, KEY)
    assert not report.ok and "is full" in report.message


@pytest.mark.parametrize(
    ("client", "server", "ok"),
    [
        ("0.1.0", "0.1.7", True),
        ("0.1.0", "0.2.0", False),
        ("1.2.0", "1.9.1", True),
        ("1.0.0", "2.0.0", False),
        ("0.1.0", "garbage", False),
    ],
)
def test_version_rule(client, server, ok):
    assert backends.compatible(client, server) is ok


class Store:
    def __init__(self) -> None:
        self.data: dict = {}

    def value(self, key):
        return self.data.get(key)

    def setValue(self, key, value):  # noqa: N802
        self.data[key] = str(value)

    def remove(self, key):
        self.data.pop(key, None)


def test_settings_keep_the_key_in_memory_unless_remembered():
    store = Store()
    s = backends.BackendSettings(kind="remote", url="http://h:8000", api_key="secret-key-123")
    s.save(store)
    assert "secret-key-123" not in json.dumps(store.data) and "secret" not in repr(s)
    back = backends.BackendSettings.load(store)
    assert (back.kind, back.url, back.api_key, back.remember_key) == (
        "remote",
        "http://h:8000",
        "",
        False,
    )

    s.remember_key = True
    s.save(store)
    assert backends.BackendSettings.load(store).api_key == "secret-key-123"
    s.remember_key = False  # un-ticking forgets the stored key
    s.save(store)
    assert backends.API_KEY_KEY not in store.data
    assert backends.BackendSettings.load(store).api_key == ""

    store.data[backends.KIND_KEY] = "cloud"  # unknown: falls back to local
    assert backends.BackendSettings.load(store).kind == "local"


def test_each_backend_installs_only_what_it_needs(monkeypatch):
    versions = {
        "torch": None,
        "tqdm": None,
        "safetensors": None,
        "numpy": "2.0",
        "zstandard": None,
        "onnxruntime": None,
        "onnx": None,
    }
    monkeypatch.setattr(deps, "_installed", lambda name: versions.get(name))
    assert [r.name for r in backends.missing("local")][0] == "torch"
    assert [r.name for r in backends.missing("remote")] == ["zstandard"]
    assert {r.name for r in backends.missing("onnx")} == {"onnxruntime", "onnx", "tqdm"}
    assert "PyTorch is not part" in deps.plan_text(backends.missing("remote"))

    def pip(reqs):
        for r in reqs:
            versions[deps.parse(r)[0]] = "99"

    host = Host(utils=types.SimpleNamespace(), pip=pip)  # a torch install would use utils
    outcome = install.install_dependencies(host, missing=lambda: backends.missing("remote"))
    assert outcome == install.DONE
    assert host.kinds() == ["confirm", "pip_install"]  # no PyTorch step at all
    assert "- torch" not in host.calls[0][1] and host.calls[1][1] == ["zstandard>=0.22"]
    assert versions["torch"] is None
    with pytest.raises(ValueError, match="unknown backend"):
        backends.requirements("cloud")


def test_onnx_backend_is_offered_only_when_fastsam3d_runs_it_without_torch(monkeypatch):
    import fastsam3d.onnx as fonnx

    usable, why = backends.onnx_status()
    if not getattr(fonnx, backends.ONNX_FLAG, False):
        assert not usable and "without PyTorch" in why
        with pytest.raises(backends.BackendError, match="ONNX Runtime backend unavailable"):
            backends.build_engine(backends.BackendSettings(kind=backends.ONNX))
    monkeypatch.setattr(fonnx, backends.ONNX_FLAG, True, raising=False)
    monkeypatch.setattr(
        backends.importlib.util,
        "find_spec",
        lambda name: None if name == "onnxruntime" else object(),
    )
    usable, why = backends.onnx_status()
    assert usable and "onnxruntime is not installed" in why


# -- the panel (Widget harness: FastSAM3DSlicer.py with Qt and the app stood in) ------------


def test_panel_remote_backend_tests_loads_and_segments_like_local(env, srv):  # noqa: F811
    scene = env.scene
    w = _panel(env, "local")
    assert w._backendKind() == "local"
    w = _panel(env, "remote", srv.url, KEY)  # the user picks "Remote server", URL and key
    assert FakeSettings.data[backends.KIND_KEY] == "remote"
    assert KEY not in json.dumps(FakeSettings.data)  # not remembered: memory only
    assert w.onTestConnection().ok
    assert w.ui.backendStatusLabel.text.startswith("connected: ")
    w.ui.apiKeyLineEdit.text = "wrong-key-0123456789"
    assert w.onTestConnection().message.startswith("wrong API key")
    w.ui.apiKeyLineEdit.text = KEY
    w.onServerSettingsChanged()

    w.onLoadModel()  # no weights, no PyTorch step: the server's model
    assert w.engineFuture is not None
    while w.engineFuture is not None:
        w._pollEngine()
    assert isinstance(w.logic.engine, backends.RemoteBackendEngine)
    assert "remote" in w.ui.deviceLabel.text

    w.ui.segmentEditorWidget.volume = scene.volume
    w.ui.segmentEditorWidget.segmentation = scene.segmentation
    w.ui.segmentEditorWidget.segment = scene.target
    w.onPositive()
    assert send(env, QE.MouseButtonPress, pos=(200, 150))
    assert send(env, QE.MouseButtonRelease, pos=(200, 150))
    run_event_loop()
    w.logic.wait()
    w.onPoll()
    (prompt,) = w.logic.prompts()
    remote_voxels = scene.segment(scene.target)
    scene.scene.SetSaveToXMLString(1)
    scene.scene.Commit()  # what "Save" would write: no key, no URL-with-key anywhere
    xml = scene.scene.GetSceneXMLString()
    assert "vtkMRMLSegmentationNode" in xml or "Segmentation" in xml
    assert KEY not in xml

    local = InteractiveLogic(FastSAM3DEngine.from_model(fixture_model("fastsam3d", **TINY), "cpu"))
    other = build_scene()
    local.set_target(other.volume, other.segmentation, other.target)
    local.add_point(prompt.world, True)
    local.wait()
    local.close()
    assert remote_voxels.any()
    np.testing.assert_array_equal(remote_voxels, other.segment(other.target))

    # Back to local: the remote engine's sessions end on the server.
    w.ui.backendComboBox.currentIndex = w._backendKeys.index("local")
    w.onBackendChanged()
    w._closingThread.join(30)  # the sessions are closed on a thread (network calls)
    assert w.logic is None and srv.app.state.manager.stats()["sessions"] == 0


def _panel(env, kind: str, url: str = "", key: str = ""):  # noqa: F811
    import test_interaction_widget as harness

    w = env.widget
    if w.logic is not None:
        w.logic.close()
        w.logic = None
    for name in ("serverUrlLineEdit", "apiKeyLineEdit", "backendStatusLabel"):
        setattr(w.ui, name, harness.Widget(text=""))
    w.ui.backendComboBox = harness.Widget(currentIndex=0)
    w.ui.rememberApiKeyCheckBox = harness.Widget()
    w._setupBackend()
    w.ui.backendComboBox.currentIndex = w._backendKeys.index(kind)
    w.ui.serverUrlLineEdit.text, w.ui.apiKeyLineEdit.text = url, key
    w.onBackendChanged()
    return w


def test_panel_remote_asks_only_for_its_packages_and_never_for_torch(env, monkeypatch):  # noqa: F811
    versions = {"numpy": "2.0"}  # no torch, no zstandard
    monkeypatch.setattr(deps, "_installed", lambda name: versions.get(name))
    w = _panel(env, "local")
    assert "torch" in w.ui.dependenciesStatusLabel.text
    w = _panel(env, "remote")
    assert w.ui.dependenciesStatusLabel.text.startswith("missing: zstandard")
    assert "torch" not in w.ui.dependenciesStatusLabel.text
    assert [r.name for r in w._backendMissing()] == ["zstandard"]


def test_panel_offers_onnx_and_asks_only_for_its_packages(env, monkeypatch):  # noqa: F811
    """This fastsam3d runs a session without torch, so the panel lists ONNX Runtime; choosing
    it, the install step lists onnxruntime/onnx/tqdm and never PyTorch."""
    pytest.importorskip("onnxruntime")
    versions = {"numpy": "2.0"}  # no torch, no onnxruntime, no onnx, no tqdm
    monkeypatch.setattr(deps, "_installed", lambda name: versions.get(name))
    w = _panel(env, "onnx")
    assert backends.ONNX in w._backendKeys
    assert "torch" not in w.ui.dependenciesStatusLabel.text
    assert sorted(r.name for r in w._backendMissing()) == ["onnx", "onnxruntime", "tqdm"]


def test_panel_wrong_key_is_a_clear_error_and_never_logged(
    env,  # noqa: F811
    srv,
    monkeypatch,
    caplog,
):
    errors = []
    monkeypatch.setattr(sys.modules["slicer"].util, "errorDisplay", errors.append, raising=False)
    secret = "wrong-secret-key-0123456789"
    w = _panel(env, "remote", srv.url, secret)
    with caplog.at_level("DEBUG"):
        w.onLoadModel()
        while w.engineFuture is not None:
            w._pollEngine()
    assert w.logic is None and len(errors) == 1 and "wrong API key" in errors[0]
    assert secret not in caplog.text and secret not in errors[0]
    assert secret not in json.dumps(FakeSettings.data)


def test_onnx_backend_segments_through_the_lib_without_torch(tmp_path):
    """The ONNX choice for real, in a Python where torch cannot be imported: the install step
    asks for numpy/onnxruntime/onnx/tqdm only, the bundled fastsam3d offers the backend, the
    engine reads a .safetensors file (fixture weights) through ``fastsam3d.onnx``'s torch-free
    runner, and a click + undo through InteractiveLogic on real MRML writes the voxels the
    PyTorch engine (fp32) writes."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fastsam3d.checkpoint import save_safetensors

    model = fixture_model("fastsam3d")  # templates exist for the registered configs only
    ckpt = save_safetensors(model, tmp_path / "weights.safetensors")
    out = tmp_path / "after.npy"
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        import numpy as np

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        sys.path[:0] = [{str(REPO / "Testing" / "slicer" / "core")!r},
                        {str(REPO / "FastSAM3DSlicer")!r}]
        from slicer_scene import build_scene
        from FastSAM3DSlicerLib import backends
        from FastSAM3DSlicerLib.logic import FailedEdit, InteractiveLogic

        status = backends.onnx_status()
        asked = [r.name for r in backends.requirements("onnx")]
        try:
            backends.build_engine(backends.BackendSettings(kind="onnx"), "local-file")
            no_file = ""
        except backends.BackendError as e:
            no_file = str(e)
        engine = backends.build_engine(backends.BackendSettings(kind="onnx"), "local-file",
                                       local_path={str(ckpt)!r}, propagate=False)
        scene = build_scene()
        logic = InteractiveLogic(engine)
        logic.set_target(scene.volume, scene.segmentation, scene.target)
        logic.add_point(scene.world_of_ijk((20, 18, 22)), True)
        (record,) = logic.wait()
        assert not isinstance(record, FailedEdit), record
        np.save({str(out)!r}, scene.segment(scene.target))
        logic.undo()
        undone = int(scene.segment(scene.target).sum())
        logic.close()
        engine.close()
        try:
            import torch  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        print(json.dumps({{"status": list(status), "asked": asked, "no_file": no_file,
                          "undone": undone, "blocked": blocked,
                          "device": engine.device_info.description,
                          "runner": type(engine.runner).__name__,
                          "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}}))
    """)
    child_env = {
        **os.environ,
        "FASTSAM3D_CACHE": str(tmp_path / "cache"),
        "FASTSAM3D_CPU_INT8": "0",
    }
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=str(REPO),
        env=child_env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["blocked"], "the torch blocker did not work: the test would prove nothing"
    assert got["torch"] == [] and got["runner"] == "OrtRunner"
    assert got["status"] == [True, ""]
    assert set(got["asked"]) == {"numpy", "onnxruntime", "onnx", "tqdm"}
    assert "Local file" in got["no_file"]
    assert got["device"] == "ONNX Runtime (CPUExecutionProvider)"
    after_onnx = np.load(out)
    fp32 = FastSAM3DEngine.from_model(model, "cpu", precision="fp32", propagate=False)
    after_local, _ = click(fp32)
    assert after_local.sum() > 100 and got["undone"] == 0
    inter = np.logical_and(after_onnx, after_local).sum()
    assert 2 * inter / (after_onnx.sum() + after_local.sum()) >= 0.999


def test_onnx_install_step_never_installs_torch(monkeypatch):
    versions = {"numpy": "2.0", "torch": None, "onnxruntime": None, "onnx": None, "tqdm": None}
    monkeypatch.setattr(deps, "_installed", lambda name: versions.get(name))

    def pip(reqs):
        for r in reqs:
            versions[deps.parse(r)[0]] = "99"

    host = Host(utils=types.SimpleNamespace(), pip=pip)
    outcome = install.install_dependencies(host, missing=lambda: backends.missing("onnx"))
    assert outcome == install.DONE
    assert host.kinds() == ["confirm", "pip_install"]  # no PyTorch extension step
    assert "- torch" not in host.calls[0][1]
    assert sorted(deps.parse(r)[0] for r in host.calls[1][1]) == ["onnx", "onnxruntime", "tqdm"]
    assert versions["torch"] is None and not backends.needs_torch(backends.ONNX)


def test_module_build_installs_the_onnx_graph_templates(tmp_path):
    """The extension bundles fastsam3d from model/src; the ONNX backend also needs the
    package's graph templates (package data, not .py): the module's CMake copies every one of
    them into the package (run for real with CMake where installed)."""
    import shutil

    from fastsam3d.onnx.build import TEMPLATES

    wanted = sorted(p.relative_to(TEMPLATES.parents[2]).as_posix() for p in TEMPLATES.rglob("*"))
    wanted = [p for p in wanted if (TEMPLATES.parents[2] / p).is_file()]
    assert any(p.endswith("encoder.onnx") for p in wanted)
    text = (REPO / "FastSAM3DSlicer" / "CMakeLists.txt").read_text(encoding="utf-8")
    start = text.index("file(GLOB_RECURSE FASTSAM3D_PACKAGE_DATA")
    snippet = text[start : text.index("endforeach()", start) + len("endforeach()")]
    assert "fastsam3d/onnx/templates/*" in snippet and "install(" in snippet
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the snippet was checked as text only")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.20)\nproject(t NONE)\n"
        f"set(FASTSAM3D_SOURCE_DIR {(REPO / 'model' / 'src').as_posix()})\n"
        "set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/py)\n"
        "set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/py)\n" + snippet + "\n"
    )
    build, inst = tmp_path / "build", tmp_path / "inst"
    for cmd in (
        ["cmake", "-S", str(tmp_path / "src"), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={inst}"],
        ["cmake", "--install", str(build), "--component", "RuntimeLibraries"],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    got = sorted(p.relative_to(inst / "lib" / "py").as_posix() for p in inst.rglob("*.*"))
    assert got == wanted
