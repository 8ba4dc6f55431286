"""First-use install flow (review M7, m2, m3, m9, m13, m14, B1's too-old message).

The flow lives in FastSAM3DSlicerLib/install.py; the Widget only supplies an InstallHost.
Here a recording host drives the same code: restart prompts, the bounded resume, the
background torch install that keeps pumping the UI, Slicer's pip helpers.
"""

from __future__ import annotations

import ast
import http.server
import importlib.machinery
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "FastSAM3DSlicer"
sys.path.insert(0, str(MODULE_DIR))

from FastSAM3DSlicerLib import deps, install, waiting, weights  # noqa: E402


class Store:
    """QSettings' value/setValue/remove over a dict."""

    def __init__(self) -> None:
        self.data: dict = {}

    def value(self, key):
        return self.data.get(key)

    def setValue(self, key, value):  # noqa: N802
        self.data[key] = value

    def remove(self, key):
        self.data.pop(key, None)


class Host(install.InstallHost):
    def __init__(
        self,
        *,
        utils=None,
        extension=False,
        restart_now=False,
        confirm=True,
        install_ok=True,
        cancel_after=None,
        pip=None,
    ) -> None:
        self.store = Store()
        self.slicer_version = "5.12.3"
        self.utils, self.extension, self.restart_now = utils, extension, restart_now
        self.confirm_answer, self.install_ok, self.cancel_after = confirm, install_ok, cancel_after
        self.pip = pip
        self.calls: list = []
        self.pumps = 0
        self.progress_calls = 0

    def confirm(self, text):
        self.calls.append(("confirm", text))
        return self.confirm_answer

    def ask_restart(self, text):
        self.calls.append(("ask_restart", text))
        return self.restart_now

    def restart(self):
        self.calls.append(("restart",))

    def error(self, text):
        self.calls.append(("error", text))

    def info(self, text):
        self.calls.append(("info", text))

    def pytorch_utils(self):
        return self.utils

    def extension_installed(self, name):
        assert name == "PyTorch"
        return self.extension

    def install_extension(self, name):
        self.calls.append(("install_extension", name))
        return self.install_ok

    def pip_install(self, requirements):
        self.calls.append(("pip_install", list(requirements)))
        if self.pip:
            self.pip(requirements)

    def progress(self, text):
        self.progress_calls += 1
        return self.cancel_after is not None and self.progress_calls > self.cancel_after

    def pump(self):
        self.pumps += 1

    def done_waiting(self):
        self.calls.append(("done_waiting",))

    def kinds(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def have(monkeypatch):
    """Installed versions as deps sees them: a dict the test (and the fake installers) edit."""
    versions = {"torch": None, "tqdm": "4.66", "safetensors": None}
    monkeypatch.setattr(deps, "_installed", lambda name: versions.get(name))
    return versions


# -- minimum Slicer -------------------------------------------------------------------------


def test_too_old_slicer_is_named():
    assert install.version_problem("5.8.1", (3, 9, 10)) is None
    assert install.version_problem("5.12.3", (3, 12, 10)) is None
    old = install.version_problem("5.6.2", (3, 9, 10))
    assert old and "5.8 or newer" in old and "5.6.2" in old
    assert install.version_problem("5.10.0", (3, 8, 10))  # a Python older than 3.9
    assert install.version_problem("", (3, 12, 0))  # unknown version: refuse clearly


def test_install_refuses_on_a_too_old_slicer(have):
    host = Host()
    host.slicer_version = "5.6.2"
    assert install.install_dependencies(host) == install.FAILED
    assert host.kinds() == ["error"] and "5.8 or newer" in host.calls[0][1]


# -- the pending record never reopens the module in a loop ----------------------------------


def test_resume_at_startup_is_bounded():
    store = Store()
    pending = install.PendingInstall(store)
    assert not install.resume_at_startup(store)
    pending.mark("restart")
    opened = [install.resume_at_startup(store) for _ in range(6)]  # six Slicer start-ups
    assert opened == [True] * install.MAX_RESUMES + [False] * (6 - install.MAX_RESUMES)
    assert not pending.active


def test_the_old_flag_value_is_understood():
    store = Store()
    store.setValue(install.PENDING_INSTALL_KEY, "1")  # what the previous version wrote
    assert install.PendingInstall(store).active and install.resume_at_startup(store)


# -- the PyTorch extension path -------------------------------------------------------------


def test_extension_installed_but_not_loaded_offers_a_restart(have):
    later = Host(extension=True, restart_now=False)
    assert install.install_dependencies(later) == install.RESTART_PENDING
    assert later.kinds() == ["confirm", "ask_restart", "info"]
    assert "has not loaded it yet" in later.calls[1][1]
    assert "Restart Slicer now?" in later.calls[1][1]
    assert install.PendingInstall(later.store).reason == "restart"  # resumes after the restart

    now = Host(extension=True, restart_now=True)
    assert install.install_dependencies(now) == install.RESTARTING
    assert now.kinds()[-1] == "restart"


def test_missing_extension_is_installed_then_a_restart_is_offered(have):
    host = Host(extension=False)
    assert install.install_dependencies(host) == install.RESTART_PENDING
    assert host.kinds() == ["confirm", "install_extension", "ask_restart", "info"]
    assert "was installed" in host.calls[2][1]


def test_no_extensions_manager_says_what_to_do_and_forgets_the_record(have):
    host = Host(extension=None)
    assert install.install_dependencies(host) == install.FAILED
    assert host.kinds() == ["confirm", "error"] and "Extensions Manager" in host.calls[1][1]
    assert not install.PendingInstall(host.store).active


def test_failed_extension_install_is_reported(have):
    host = Host(extension=False, install_ok=False)
    assert install.install_dependencies(host) == install.FAILED
    assert host.kinds()[-1] == "error"
    assert not install.PendingInstall(host.store).active


def test_declined_dialog_installs_nothing(have):
    host = Host(confirm=False, extension=True)
    assert install.install_dependencies(host) == install.CANCELLED
    assert host.kinds() == ["confirm"] and not install.PendingInstall(host.store).active


def test_resuming_does_not_ask_again(have):
    host = Host(extension=True)
    install.install_dependencies(host, resuming=True)
    assert "confirm" not in host.kinds()


# -- torch in a background process, the UI pumped meanwhile ---------------------------------


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_torch_installs_in_the_background_while_the_ui_is_pumped(have, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # torch not imported this session
    marker = tmp_path / "torch-installed"
    slow = _child(
        "import time, pathlib, sys\n"
        "print('Collecting torch', flush=True)\n"
        "time.sleep(1.0)\n"
        f"pathlib.Path({str(marker)!r}).write_text('2.13.0')\n"
        "print('Successfully installed torch-2.13.0', flush=True)\n"
    )
    real_installed = deps._installed
    monkeypatch.setattr(
        deps,
        "_installed",
        lambda name: (
            marker.read_text(encoding="utf-8")
            if name == "torch" and marker.exists()
            else real_installed(name)
        ),
    )
    host = Host(utils=types.SimpleNamespace(), pip=lambda reqs: have.update(safetensors="0.4.5"))
    outcome = install.install_dependencies(host, torch_commands_override=[slow])
    assert outcome == install.DONE, host.calls
    # The main thread pumped the UI all along (the old code ran the installer on the main
    # thread: not one event in between), and showed progress with the installer's output.
    assert host.pumps >= 10 and host.progress_calls >= 10
    assert host.calls[-2:] == [("done_waiting",), ("pip_install", ["safetensors>=0.4"])]
    assert not install.PendingInstall(host.store).active


def test_a_second_request_while_installing_is_refused(have, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    slow = _child("import time\ntime.sleep(0.5)\n")
    nested = []
    host = Host(utils=types.SimpleNamespace())
    inner = Host(utils=types.SimpleNamespace())

    def pump():  # the user presses Install again while the UI is live
        if not nested:
            nested.append(install.install_dependencies(inner, torch_commands_override=[slow]))

    host.pump = pump
    install.install_dependencies(host, torch_commands_override=[slow])
    assert nested == [install.BUSY] and inner.kinds() == ["info"]


def test_cancel_stops_the_installer(have, tmp_path):
    forever = _child("import time\nprint('downloading', flush=True)\ntime.sleep(60)\n")
    host = Host(utils=types.SimpleNamespace(), cancel_after=3)
    started = time.monotonic()
    assert install.install_dependencies(host, torch_commands_override=[forever]) == (
        install.CANCELLED
    )
    assert time.monotonic() - started < 30
    assert "pip_install" not in host.kinds()
    assert not install.PendingInstall(host.store).active


def test_installer_failure_shows_its_output(have):
    failing = _child(
        "print('ERROR: No matching distribution found for torch>=2.4')\nraise SystemExit(3)\n"
    )
    host = Host(utils=types.SimpleNamespace())
    assert install.install_dependencies(host, torch_commands_override=[failing]) == install.FAILED
    kind, text = host.calls[-1]
    assert kind == "error" and "status 3" in text and "No matching distribution" in text


def test_upgrading_an_imported_torch_asks_for_a_restart(have, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    have["torch"] = "2.1.0"  # below the floor: an upgrade
    ok = _child("print('Successfully installed torch-2.13.0')")
    host = Host(utils=types.SimpleNamespace())
    assert install.install_dependencies(host, torch_commands_override=[ok]) == (
        install.RESTART_PENDING
    )
    asked = [c[1] for c in host.calls if c[0] == "ask_restart"]
    assert len(asked) == 1 and "PyTorch was upgraded" in asked[0]


def test_light_the_torch_gets_pytorchutils_arguments():
    class PyTorchUtilsLogic:  # SlicerPyTorch's PyTorchUtils.py (e1c85cc), the part we call
        @staticmethod
        def _getPipInstallArguments(
            forceComputationBackend=None,
            torchVersionRequirement=None,
            torchvisionVersionRequirement=None,
        ):
            args = [
                "install",
                "torch" + (torchVersionRequirement or ""),
                "torchvision" + (torchvisionVersionRequirement or ""),
            ]
            if forceComputationBackend is not None:
                args.append(f"--pytorch-computation-backend={forceComputationBackend}")
            return args

    utils = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
    want = ["install", f"torch{deps.torch_spec()}", "torchvision"]
    assert install.torch_install_arguments(utils) == want
    assert install.torch_install_arguments(types.SimpleNamespace()) == want
    commands = install.torch_commands(utils, python="/opt/Slicer/bin/PythonSlicer")
    assert commands[-1] == ["/opt/Slicer/bin/PythonSlicer", "-m", "light_the_torch", *want]


# -- the other packages: slicer.packaging imported explicitly (m2), safetensors (m3) ---------


def test_pip_ensure_is_found_without_import_slicer_loading_it(monkeypatch):
    seen = []
    fake = types.ModuleType("slicer.packaging")
    fake.pip_ensure = lambda reqs, **kw: seen.append((reqs, kw))
    monkeypatch.setitem(sys.modules, "slicer.packaging", fake)
    import slicer

    # `import slicer` does not set slicer.packaging: the old getattr() never found it.
    monkeypatch.delattr(slicer, "packaging", raising=False)
    install.pip_installer(lambda text: pytest.fail("fell back to pip_install"))(["tqdm>=4.60"])
    assert seen == [
        (
            ["tqdm>=4.60"],
            {"requester": "FastSAM3D", "prompt_install": False, "skip_in_testing": False},
        )
    ]


def test_pip_ensure_gets_only_the_options_it_has(monkeypatch):
    seen = []
    fake = types.ModuleType("slicer.packaging")

    def pip_ensure(requirements, prompt_install=True, requester=None):  # an older signature
        seen.append((requirements, prompt_install, requester))

    fake.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", fake)
    install.pip_installer(lambda text: pytest.fail("fell back"))(["safetensors>=0.4"])
    assert seen == [(["safetensors>=0.4"], False, "FastSAM3D")]


def test_pip_install_is_the_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import raises ImportError
    seen = []
    install.pip_installer(seen.append)(["tqdm>=4.60", "safetensors>=0.4"])
    assert seen == ["tqdm>=4.60 safetensors>=0.4"]


# Imported by the Slicer code paths but provided by Slicer itself, or optional by design.
SLICER_BUNDLED = {
    "qt",
    "ctk",
    "slicer",
    "vtk",
    "numpy",
    "SimpleITK",
    "SampleData",
    "PyTorchUtils",
    "SegmentEditorEffects",
}
OPTIONAL = {
    "flash_attn": "an optional accelerator, probed with flash_available()",
    "nibabel": "file reading when SimpleITK is absent (Slicer bundles SimpleITK)",
    "light_the_torch": "installed by the install flow itself",
    "onnxruntime": "fastsam3d.onnx's CPU backend, used only where it is installed (available())",
    "onnx": "ONNX export (fastsam3d.onnx.export, the export-onnx command), not a Slicer path",
    "zstandard": "faster compression of the remote session's wire format; zlib without it",
}


def _imports_anywhere(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_package_the_module_imports_is_installed_by_the_dependency_step():
    from test_slicer_py39 import slicer_files

    used = set().union(*(_imports_anywhere(p) for p in slicer_files()))
    first_party = {"fastsam3d", "FastSAM3DSlicerLib", "FastSAM3DSlicerQt", "FastSAM3DSlicer"}
    third_party = used - set(sys.stdlib_module_names) - first_party - SLICER_BUNDLED
    installed = {"torch"} | {deps.parse(r)[0] for r in deps.PIP_REQUIREMENTS}
    from FastSAM3DSlicerLib import backends  # the remote / ONNX backends' own steps

    installed |= {
        deps.parse(r)[0] for r in backends.REMOTE_REQUIREMENTS + backends.ONNX_REQUIREMENTS
    }
    assert third_party - set(OPTIONAL) <= installed, third_party - set(OPTIONAL) - installed
    assert "safetensors" in installed  # checkpoint.py reads .safetensors files


def test_torch_floor_matches_the_package():
    """m14: the floor asked of PyTorchUtils is fastsam3d's own, the one pyproject states."""
    import tomllib

    pyproject = (REPO / "model" / "pyproject.toml").read_text(encoding="utf-8")
    project = tomllib.loads(pyproject)["project"]
    torch_extra = project["optional-dependencies"]["torch"]  # torch is the `torch` extra
    floors = [d for d in torch_extra if deps.parse(d)[0] == "torch"]
    package = deps.package_torch_requirement()
    assert floors == [f"torch{package}"], (floors, package)
    assert deps.torch_spec((3, 12)) == package and deps.python39_note((3, 12)) is None


def test_python39_asks_for_a_torch_that_exists_and_says_what_it_cannot_do(have):
    """Slicer 5.8: no torch at fastsam3d's floor exists for Python 3.9; the module asks for
    the oldest torch its code runs on and says that only .safetensors checkpoints load."""
    assert deps.torch_spec((3, 9)) == deps.PY39_TORCH_REQUIREMENT
    note = deps.python39_note((3, 9))
    assert note and ".safetensors" in note and "Slicer 5.10" in note


# -- the bundled fastsam3d wins (m13) -------------------------------------------------------


def test_bundled_fastsam3d_wins_over_an_installed_one(tmp_path):
    shadow = tmp_path / "site" / "fastsam3d"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("SHADOW = True\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from FastSAM3DSlicerLib import engine; engine.ensure_fastsam3d_importable();"
        "import fastsam3d; print(fastsam3d.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # like a pip install in Slicer
    proc = subprocess.run(
        [sys.executable, "-c", code, str(MODULE_DIR)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    origin = Path(proc.stdout.strip()).resolve()
    assert origin == (REPO / "model" / "src" / "fastsam3d" / "__init__.py").resolve()


def test_shadowing_after_import_is_reported(tmp_path, monkeypatch):
    fake = types.ModuleType("fastsam3d")
    fake.__file__ = str(tmp_path / "site" / "fastsam3d" / "__init__.py")
    monkeypatch.setitem(sys.modules, "fastsam3d", fake)
    monkeypatch.setattr(sys, "path", list(sys.path))
    warning = deps.prefer_bundled_fastsam3d()
    assert warning and "restart Slicer" in warning and str(tmp_path) in warning
    assert sys.path[0] == str(deps.bundled_fastsam3d_dir())


# -- the size probe does not block the main thread (m9) -------------------------------------


class _SlowHead(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802
        time.sleep(0.8)
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_size_probe_lets_the_ui_run():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHead)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pth"
        pumps = []
        probe = weights.SizeProbe(url).start()
        assert waiting.wait_pumping(probe, lambda: pumps.append(1), timeout=20)
        assert probe.size == 12345
        assert len(pumps) >= 5  # the UI was pumped while the HEAD request was in flight
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- the Widget's glue (SlicerInstallHost) with Qt and the app stood in ----------------------


class _Manager:
    """qSlicerExtensionsManagerModel's two calls the host makes."""

    def __init__(self, installed: bool) -> None:
        self.installed, self.calls = installed, []

    def isExtensionInstalled(self, name):  # noqa: N802
        return self.installed

    def installExtensionFromServer(self, name, restart=True):  # noqa: N802
        self.calls.append((name, restart))
        self.installed = True
        return True


def _widget_env(monkeypatch, *, version=(5, 12), manager=None, restart_answer=False):
    import widget_harness
    from slicer_scene import slicer

    dialogs = []
    util = {
        "confirmOkCancelDisplay": lambda text, **k: dialogs.append(("confirm", text)) or True,
        "confirmYesNoDisplay": lambda text, **k: (
            dialogs.append(("restart?", text)) or restart_answer
        ),
        "infoDisplay": lambda text, **k: dialogs.append(("info", text)),
        "errorDisplay": lambda text, **k: dialogs.append(("error", text)),
        "restart": lambda: dialogs.append(("restart",)),
    }
    app = {
        "majorVersion": version[0],
        "minorVersion": version[1],
        "testingEnabled": lambda: False,
        "extensionsManagerModel": lambda: manager,
    }
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not loaded
    env = widget_harness.load_widget(monkeypatch, slicer.vtkMRMLScene(), app=app, util=util)
    env.dialogs = dialogs
    return env


def test_widget_says_the_pytorch_extension_needs_a_restart(have, monkeypatch):
    """M7: installed but not loaded -> an explicit restart question, then a message; the
    panel still says what is missing; the next start-up resumes, but not forever."""
    manager = _Manager(installed=True)
    env = _widget_env(monkeypatch, manager=manager)
    assert env.widget.onInstallDependencies() is False
    kinds = [d[0] for d in env.dialogs]
    assert kinds == ["confirm", "restart?", "info"], env.dialogs
    assert "has not loaded it yet" in env.dialogs[1][1]
    assert "torch" in env.widget.ui.dependenciesStatusLabel.text
    module = env.module.FastSAM3DSlicer.__new__(env.module.FastSAM3DSlicer)
    module.moduleName = "FastSAM3DSlicer"
    for _ in range(5):  # five Slicer start-ups
        module._resumePendingInstall()
    assert env.calls.count(("selectModule", "FastSAM3DSlicer")) == install.MAX_RESUMES


def test_widget_installs_the_extension_without_an_automatic_restart(have, monkeypatch):
    manager = _Manager(installed=False)
    env = _widget_env(monkeypatch, manager=manager, restart_answer=True)
    env.widget.onInstallDependencies()
    assert manager.calls == [("PyTorch", False)]  # we ask for the restart ourselves
    assert [d[0] for d in env.dialogs] == ["confirm", "restart?", "restart"]


def test_widget_names_a_slicer_too_old(have, monkeypatch):
    env = _widget_env(monkeypatch, version=(5, 6))
    assert env.widget._refreshDependencies() is False
    assert "5.8 or newer" in env.widget.ui.dependenciesStatusLabel.text
    assert env.widget.onInstallDependencies() is False
    assert env.dialogs[-1][0] == "error" and "5.8 or newer" in env.dialogs[-1][1]


def test_widget_names_a_foreign_fastsam3d_imported_first(have, monkeypatch, tmp_path):
    """m13: when another fastsam3d was imported before ours, the Setup section says so."""
    env = _widget_env(monkeypatch)
    foreign = types.ModuleType("fastsam3d")
    foreign.__file__ = str(tmp_path / "site-packages" / "fastsam3d" / "__init__.py")
    foreign.__spec__ = importlib.machinery.ModuleSpec("fastsam3d", None, origin=foreign.__file__)
    monkeypatch.setitem(sys.modules, "fastsam3d", foreign)
    monkeypatch.setattr(sys, "path", list(sys.path))
    env.widget._refreshDependencies()
    label = env.widget.ui.dependenciesStatusLabel.text
    assert "Another fastsam3d package" in label and "restart Slicer" in label


def test_widget_download_dialog_waits_for_the_size_with_the_ui_live(have, monkeypatch):
    """m9: the size request runs off the main thread; the UI is pumped meanwhile (the old
    Widget called remote_size on the main thread: no event in between)."""
    pumps = []
    env = _widget_env(monkeypatch)
    monkeypatch.setattr(sys.modules["slicer"].app, "processEvents", lambda: pumps.append(1))

    def slow_size(name, timeout=weights.SIZE_TIMEOUT_S):
        time.sleep(0.5)
        return 12345

    monkeypatch.setattr(weights, "remote_size", slow_size)
    monkeypatch.setattr(weights, "DownloadTask", lambda key: pytest.fail("declined: no download"))
    env.widget._weightChoices = [weights.Choice("fastsam3d", "FastSAM3D", "", "terms")]
    env.widget.ui.weightsComboBox.currentIndex = 0
    confirmations = []
    monkeypatch.setattr(
        sys.modules["slicer"].util,
        "confirmOkCancelDisplay",
        lambda text, **k: confirmations.append(text) or False,
    )
    env.widget.onDownloadWeights()
    assert len(pumps) >= 5
    assert confirmations and "12.1 KB" in confirmations[0]
