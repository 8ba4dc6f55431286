"""First-use installation, resumable across a Slicer restart, that never freezes the UI. No Qt.

The Widget supplies an :class:`InstallHost` (dialogs, the extensions manager, Slicer's pip
helpers, the event pump); every decision is made here, so tests drive the same flow:

- a Slicer too old to run the module is named as such (:func:`version_problem`);
- torch comes only through the PyTorch extension. When the extension is installed but not yet
  loaded (Slicer has not restarted since), nothing can import ``PyTorchUtils``: the user is
  told so and offered *Restart now* / *Later*, and the install resumes after the restart;
- torch itself is installed by light-the-torch (what ``PyTorchUtils.installTorch`` runs, with
  the same arguments) in a **background process**; the main thread waits in a GIL-releasing
  wait and pumps the UI between waits (``waiting.wait_pumping``), so Slicer stays responsive
  for the minutes a CUDA wheel takes, with elapsed time, the installer's last line and Cancel;
- the small packages (``deps.PIP_REQUIREMENTS``) go through ``slicer.packaging.pip_ensure``
  (Slicer >= 5.12; ``import slicer`` does not load it, so it is imported explicitly) or
  ``slicer.util.pip_install``;
- a pending-install record makes Slicer reopen the module after a restart at most
  ``MAX_RESUMES`` times, so an install that cannot finish never reopens it forever.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable

from . import deps, waiting

#: The oldest Slicer this module is checked against (review of 5.8.1 .. 5.13): Python 3.9 and
#: the MRML/markups/segment-editor calls the module makes.
MIN_SLICER = (5, 8)
MIN_PYTHON = (3, 9)
PENDING_INSTALL_KEY = "FastSAM3DSlicer/pendingInstall"
#: Slicer start-ups that may reopen the module to resume one install.
MAX_RESUMES = 2
PYTORCH_EXTENSION = "PyTorch"
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what PyTorchUtils installs before using it

# outcomes of install_dependencies()
DONE = "done"
CANCELLED = "cancelled"
FAILED = "failed"
RESTART_PENDING = "restart-pending"  # the user chose "Later"
RESTARTING = "restarting"  # the user chose "Restart now"
BUSY = "busy"  # an installation is already running (the UI stays live while it runs)

_running = False


def _version_tuple(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def version_problem(
    slicer_version: str, python_version: Sequence[int] = tuple(sys.version_info[:3])
) -> str | None:
    """Why this Slicer cannot run FastSAM3D (shown to the user), or None when it can."""
    have = _version_tuple(slicer_version)
    python = tuple(python_version)[:2]
    if have and have[:2] >= MIN_SLICER and python >= MIN_PYTHON:
        return None
    need = ".".join(map(str, MIN_SLICER))
    return (
        f"FastSAM3D needs 3D Slicer {need} or newer (Python "
        f"{'.'.join(map(str, MIN_PYTHON))}+); this is Slicer {slicer_version or 'unknown'} "
        f"with Python {'.'.join(map(str, python))}. Install a current Slicer from "
        "https://download.slicer.org."
    )


# -- the pending-install record -------------------------------------------------------------


class PendingInstall:
    """The "resume after restart" record, in a key/value store (QSettings, or a dict in tests).

    Stored as JSON ``{"reason": ..., "resumes": n}``; the plain ``"1"`` older versions wrote is
    read as a record with no resumes yet.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def _load(self) -> dict | None:
        raw = self.store.value(PENDING_INSTALL_KEY)
        if raw in (None, "", False):
            return None
        try:
            record = json.loads(str(raw))
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {"reason": "install", "resumes": 0}
        return record

    def _save(self, record: dict) -> None:
        self.store.setValue(PENDING_INSTALL_KEY, json.dumps(record))

    @property
    def active(self) -> bool:
        return self._load() is not None

    @property
    def reason(self) -> str | None:
        record = self._load()
        return None if record is None else str(record.get("reason", "install"))

    def mark(self, reason: str) -> None:
        """Record (before anything may restart Slicer) that an install is under way."""
        record = self._load() or {"resumes": 0}
        record["reason"] = reason
        self._save(record)

    def clear(self) -> None:
        self.store.remove(PENDING_INSTALL_KEY)

    def resume_at_startup(self) -> bool:
        """Called once per Slicer start-up: reopen the module to resume? Counts the resumes.

        After ``MAX_RESUMES`` start-ups the record is dropped, so an install that cannot
        finish (the user keeps postponing, the extension never loads) stops reopening the
        module; the dependencies line of the panel still says what is missing.
        """
        record = self._load()
        if record is None:
            return False
        resumes = int(record.get("resumes", 0))
        if resumes >= MAX_RESUMES:
            self.clear()
            return False
        record["resumes"] = resumes + 1
        self._save(record)
        return True


# -- torch through the PyTorch extension ----------------------------------------------------


def torch_install_arguments(pytorch_utils: Any, requirement: str | None = None) -> list[str]:
    """light-the-torch's arguments, as ``PyTorchUtilsLogic.installTorch`` builds them."""
    requirement = deps.torch_spec() if requirement is None else requirement
    logic = getattr(pytorch_utils, "PyTorchUtilsLogic", None)
    build = getattr(logic, "_getPipInstallArguments", None)
    if build is not None:
        try:
            return [str(a) for a in build(None, requirement)]
        except TypeError:  # a PyTorchUtils with another signature: use the documented form
            pass
    return ["install", f"torch{requirement}", "torchvision"]


def python_executable() -> str:
    """Slicer's command-line Python (``PythonSlicer``, on PATH inside Slicer), else this one."""
    return shutil.which("PythonSlicer") or sys.executable


def torch_commands(
    pytorch_utils: Any, python: str | None = None, requirement: str | None = None
) -> list[list[str]]:
    """The commands the background install runs: light-the-torch if missing, then torch."""
    python = python or python_executable()
    commands = []
    if importlib.util.find_spec("light_the_torch") is None:
        commands.append([python, "-m", "pip", "install", LIGHT_THE_TORCH])
    commands.append(
        [python, "-m", "light_the_torch", *torch_install_arguments(pytorch_utils, requirement)]
    )
    return commands


class BackgroundInstall:
    """Commands run one after the other in a child process, off the main thread.

    A reader thread collects the output (pip prints nothing for minutes while it downloads a
    large wheel, so nothing here depends on output arriving). ``wait(timeout)`` releases the
    GIL, so it fits ``waiting.wait_pumping``; ``cancel()`` terminates the running command.
    """

    def __init__(
        self, commands: Sequence[Sequence[str]], env: dict | None = None, keep_lines: int = 200
    ) -> None:
        self.commands = [list(c) for c in commands]
        self.env = env
        self.lines: collections.deque = collections.deque(maxlen=keep_lines)
        self.returncode: int | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.started = 0.0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="FastSAM3D-install", daemon=True)

    def start(self) -> BackgroundInstall:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for command in self.commands:
                with self._lock:
                    if self.cancelled:
                        break
                    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console on Windows
                    self._proc = subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self.env,
                        text=True,
                        errors="replace",
                        creationflags=flags,
                    )
                self.lines.append("$ " + " ".join(command))
                for line in self._proc.stdout:
                    if line.strip():
                        self.lines.append(line.rstrip())
                self.returncode = self._proc.wait()
                if self.returncode != 0:
                    break
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        return (
            self.finished and not self.cancelled and self.error is None and (self.returncode == 0)
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    @property
    def last_line(self) -> str:
        return self.lines[-1] if self.lines else ""

    def cancel(self, grace_s: float = 5.0) -> None:
        with self._lock:
            self.cancelled = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()

    def failure_text(self) -> str:
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        tail = "\n".join(list(self.lines)[-15:])
        return f"the installer exited with status {self.returncode}:\n{tail}"


# -- the rest through Slicer's pip helpers ---------------------------------------------------


def pip_installer(fallback_pip_install: Callable[[str], Any]) -> Callable[[list[str]], Any]:
    """``slicer.packaging.pip_ensure`` when this Slicer has it (5.12+), else ``pip_install``.

    ``import slicer`` loads only Slicer's kits, not ``slicer.packaging`` (review m2), so it is
    imported here explicitly.
    """
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    ensure = getattr(packaging, "pip_ensure", None)
    if ensure is not None:
        wanted = {"requester": "FastSAM3D", "prompt_install": False, "skip_in_testing": False}
        try:  # pass only what this Slicer's pip_ensure takes (its options grew over releases)
            params = inspect.signature(ensure).parameters
            if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                wanted = {k: v for k, v in wanted.items() if k in params}
        except (TypeError, ValueError):
            pass
        return lambda reqs: ensure(list(reqs), **wanted)
    return lambda reqs: fallback_pip_install(" ".join(reqs))


# -- the whole flow -------------------------------------------------------------------------


class InstallHost:
    """What the flow needs from the application. The Widget implements it with Slicer's
    dialogs and managers; tests implement it with recorders. Every method is called on the
    main thread."""

    testing = False  # Slicer's --testing: no confirmation dialogs
    slicer_version = ""
    store: Any = None  # key/value store for the pending record (QSettings)

    def confirm(self, text: str) -> bool:
        raise NotImplementedError

    def ask_restart(self, text: str) -> bool:
        """Restart now (True) or later (False)."""
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def error(self, text: str) -> None:
        raise NotImplementedError

    def info(self, text: str) -> None:
        raise NotImplementedError

    def pytorch_utils(self) -> Any:
        """The PyTorchUtils module when Slicer has loaded the PyTorch extension, else None."""
        raise NotImplementedError

    def extension_installed(self, name: str) -> bool | None:
        """None when there is no extensions manager to ask."""
        raise NotImplementedError

    def install_extension(self, name: str) -> bool:
        """Install from the Extensions server without restarting; True when installed."""
        raise NotImplementedError

    def pip_install(self, requirements: list[str]) -> None:
        raise NotImplementedError

    def progress(self, text: str) -> bool:
        """Show progress (and pump events); return True when the user pressed Cancel."""
        raise NotImplementedError

    def pump(self) -> None:
        raise NotImplementedError

    def done_waiting(self) -> None:
        """The background step ended: close the progress display."""


RESTART_TEXTS = {
    "extension-installed": "The PyTorch extension was installed. Slicer must restart to load it",
    "extension-not-loaded": "The PyTorch extension is installed, but Slicer has not loaded it "
    "yet. Slicer must restart to load it",
    "torch-upgraded": "PyTorch was upgraded, but this session still runs the old version. "
    "Slicer must restart to use the new one",
}


def _ask_restart(host: InstallHost, pending: PendingInstall, why: str) -> str:
    pending.mark("restart")
    text = (
        f"{RESTART_TEXTS[why]}; FastSAM3D then continues the installation when it opens "
        "again.\n\nRestart Slicer now?"
    )
    if host.ask_restart(text):
        host.restart()
        return RESTARTING
    host.info(
        "FastSAM3D is not ready yet: restart Slicer when convenient; the installation "
        "continues when you open FastSAM3D afterwards."
    )
    return RESTART_PENDING


def install_torch(
    host: InstallHost, pytorch_utils: Any, commands: list[list[str]] | None = None
) -> str:
    """Run light-the-torch in the background while the UI keeps running."""
    task = BackgroundInstall(commands or torch_commands(pytorch_utils)).start()

    def cancelled() -> bool:
        label = (
            f"Installing PyTorch through the PyTorch extension "
            f"({task.elapsed:.0f} s; large CUDA builds take minutes).\n{task.last_line}"
        )
        return host.progress(label[:400])

    try:
        waiting.wait_pumping(task, host.pump, stop=cancelled)
        if not task.finished:
            task.cancel()
            task.wait(10.0)
            return CANCELLED
    finally:
        host.done_waiting()
    importlib.invalidate_caches()
    if not task.ok:
        host.error("Installing PyTorch failed: " + task.failure_text())
        return FAILED
    return DONE


def install_dependencies(
    host: InstallHost,
    resuming: bool = False,
    torch_commands_override: list[list[str]] | None = None,
    missing: Callable[[], list] | None = None,
) -> str:
    """The one first-use flow (the Widget's "Install..." button and the resume after restart).

    Returns DONE, CANCELLED, FAILED, RESTART_PENDING, RESTARTING or BUSY. Every outcome but
    DONE and RESTARTING has told the user why. The pending record is set before anything that
    may restart Slicer and cleared on every outcome that does not wait for a restart. The UI
    runs while torch installs, so a second request (the button again, the module re-entered)
    is answered BUSY instead of starting a second installer. ``missing``: what the chosen
    backend needs and lacks (``backends.missing``; default ``deps.missing``, the local one), so
    the remote and ONNX backends never install torch.
    """
    global _running
    if _running:
        host.info("FastSAM3D's dependencies are being installed; wait for it to finish.")
        return BUSY
    _running = True
    try:
        return _install(host, resuming, torch_commands_override, missing or deps.missing)
    finally:
        _running = False


def _install(
    host: InstallHost,
    resuming: bool,
    torch_commands_override: list[list[str]] | None,
    missing_now: Callable[[], list],
) -> str:
    pending = PendingInstall(host.store)
    problem = version_problem(host.slicer_version)
    if problem:
        pending.clear()
        host.error(problem)
        return FAILED
    missing = missing_now()
    if not missing:
        pending.clear()
        return DONE
    if not resuming and not host.testing and not host.confirm(deps.plan_text(missing)):
        return CANCELLED
    pending.mark("install")
    outcome = DONE
    try:
        if any(r.name == "torch" for r in missing):
            outcome = _torch_step(host, pending, torch_commands_override)
            if outcome != DONE:
                if outcome in (CANCELLED, FAILED):
                    pending.clear()
                return outcome
        pip_reqs = [r.text for r in missing_now() if r.name != "torch"]
        if pip_reqs:
            host.pip_install(pip_reqs)
    except Exception as e:  # noqa: BLE001 - shown to the user; nothing is retried at start-up
        pending.clear()
        host.error(f"Installing FastSAM3D's dependencies failed: {type(e).__name__}: {e}")
        return FAILED
    importlib.invalidate_caches()
    still = missing_now()
    pending.clear()
    if still:
        host.error(
            "These packages are still missing after the installation: "
            + ", ".join(r.text for r in still)
            + ". See the Python console for details."
        )
        return FAILED
    return DONE


def _torch_step(
    host: InstallHost, pending: PendingInstall, commands: list[list[str]] | None
) -> str:
    utils = host.pytorch_utils()
    if utils is not None:
        loaded_before = "torch" in sys.modules  # an older torch this session cannot drop
        outcome = install_torch(host, utils, commands)
        if outcome == DONE and loaded_before:
            return _ask_restart(host, pending, "torch-upgraded")
        return outcome
    installed = host.extension_installed(PYTORCH_EXTENSION)
    if installed:
        return _ask_restart(host, pending, "extension-not-loaded")
    if installed is None:
        host.error(
            "FastSAM3D needs the PyTorch extension: install 'PyTorch' from the "
            "Extensions Manager, restart Slicer and open FastSAM3D again."
        )
        return FAILED
    pending.mark("restart")  # the extension install itself may restart Slicer
    if not host.install_extension(PYTORCH_EXTENSION):
        host.error(
            "Could not install the PyTorch extension from the Extensions server. "
            "Install 'PyTorch' from the Extensions Manager, restart Slicer and open "
            "FastSAM3D again."
        )
        return FAILED
    return _ask_restart(host, pending, "extension-installed")


def resume_at_startup(store: Any) -> bool:
    """The module's ``startupCompleted`` hook: reopen FastSAM3D to resume an install?"""
    return PendingInstall(store).resume_at_startup()
