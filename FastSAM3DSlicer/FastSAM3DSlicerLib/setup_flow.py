"""Getting a network ready: dependencies, then the weights download, then the engine load.

A Qt-free state machine the Widget's timer polls, the way it polls
:class:`.logic.InteractiveLogic`: ``idle`` -> ``downloading`` (a :class:`.weights.DownloadTask`
on its own thread) -> ``loading`` (the engine built on the inference worker, where every later
click runs) -> ``idle`` with an engine handed back as a :class:`SetupEvent`. The first-use
install of missing packages is :mod:`.install`'s flow (it needs the host's dialogs); what is
missing, and the notes shown beside it, come from :func:`dependency_report`. The rules for which
controls may act while a network loads, downloads or predicts are :func:`enabled_controls`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable

from . import backends, deps, engine, install, waiting, weights
from .worker import InferenceWorker

__all__ = [
    "DOWNLOAD",
    "DOWNLOADING",
    "IDLE",
    "LOAD",
    "LOADING",
    "DependencyReport",
    "LoadRequest",
    "ModelSetup",
    "SetupEvent",
    "close_in_background",
    "dependency_report",
    "enabled_controls",
    "load_engine",
    "next_step",
]

IDLE, DOWNLOADING, LOADING = "idle", "downloading", "loading"
DOWNLOAD, LOAD = "download", "load"


@dataclasses.dataclass(frozen=True)
class DependencyReport:
    """What the Setup section says about the packages: ``problem`` (a Slicer too old: offer
    nothing), ``missing`` (offer the install), ``notes`` (a Python 3.9 limit, a foreign
    fastsam3d imported first)."""

    problem: str | None
    missing: list[Any]
    notes: list[str]

    @property
    def ready(self) -> bool:
        return self.problem is None and not self.missing

    def text(self, installed: str = "installed", missing: str = "missing: ") -> str:
        """The status label (the two words given translated by the caller)."""
        if self.problem:
            return self.problem
        head = missing + ", ".join(r.text for r in self.missing) if self.missing else installed
        return "\n".join([head, *self.notes])


def dependency_report(kind: str, slicer_version: str) -> DependencyReport:
    """What ``kind`` (a backends kind) needs and lacks on this Slicer; remote and ONNX never ask
    for torch. A foreign fastsam3d imported before ours is named (m13); on Python 3.9 only
    .safetensors checkpoints load (PyTorch's floor), which concerns the local backend only."""
    problem = install.version_problem(slicer_version)
    if problem:
        return DependencyReport(problem, [], [])
    missing = backends.missing(kind)
    notes = []
    if kind == backends.LOCAL:
        note = deps.python39_note()
        try:
            shadowed = engine.ensure_fastsam3d_importable()
        except ImportError as e:
            shadowed = str(e)
        if shadowed:
            logging.warning("FastSAM3D: %s", shadowed)
        notes = [n for n in (note, shadowed) if n]
    return DependencyReport(None, missing, notes)


def enabled_controls(
    *, has_weights: bool, loaded: bool, busy: bool, loading: bool, downloading: bool
) -> dict[str, bool]:
    """The Setup and Prompts controls' enabled state (``ui`` names). Review m1: nothing that
    replaces the network is possible while it predicts or loads; undo, reset and clear need a
    network and no prediction running."""
    swapping = loading or downloading or busy
    edits = loaded and not busy
    return {
        "downloadWeightsButton": has_weights and not downloading,
        "removeWeightsButton": has_weights and not swapping,
        "loadModelButton": not swapping,
        "weightsComboBox": not swapping,
        "deviceComboBox": not (loading or busy),
        "backendComboBox": not (loading or busy),
        "undoButton": edits,
        "resetSegmentButton": edits,
        "clearButton": edits,
    }


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """Which network to load, and where: ``kind`` a backends kind, ``weights`` a weights key
    (``engine.LOCAL_FILE`` with ``local_path``; unused for remote), ``device`` a params.DEVICES
    name, ``backend`` the BackendSettings for ONNX and remote."""

    kind: str
    weights: str
    device: str = "auto"
    local_path: str | None = None
    backend: Any = None


def next_step(request: LoadRequest, downloaded: Callable[[str], bool]) -> str:
    """:data:`LOAD`, or :data:`DOWNLOAD` first when the chosen weights are not in the cache
    (a local file and a server's own model never download)."""
    if request.kind == backends.REMOTE or request.weights == engine.LOCAL_FILE:
        return LOAD
    return LOAD if downloaded(request.weights) else DOWNLOAD


def load_engine(request: LoadRequest) -> Any:
    """Build the engine (on the inference worker): local PyTorch, or ONNX/remote through
    :func:`.backends.build_engine` (a remote connection test first)."""
    if request.kind == backends.LOCAL:
        return engine.FastSAM3DEngine.load(request.weights, request.device, request.local_path)
    return backends.build_engine(
        request.backend, request.weights, request.device, request.local_path
    )


@dataclasses.dataclass
class SetupEvent:
    """What one poll found: ``kind`` is ``progress`` (``done``/``total`` bytes), ``downloaded``,
    ``download_failed`` / ``load_failed`` (with ``error``), ``download_cancelled`` or
    ``loaded`` (with ``engine``)."""

    kind: str
    done: int = 0
    total: int | None = None
    engine: Any = None
    error: BaseException | None = None


class ModelSetup:
    """The download and load in flight (at most one of each), polled from the Widget's timer.

    ``poll_download`` / ``poll_load`` wait GIL-free with the UI pumped for at most ``max_s``
    (the worker loads at nearly full speed: 1.3x free vs 2.1x with one short wait per tick,
    bench_gil_latency.py --loads), then report what changed.
    """

    def __init__(self, worker_factory: Callable[[], Any] = InferenceWorker) -> None:
        self.worker_factory = worker_factory
        self.worker = None  # created at the first load; kept for every later click
        self.download = None  # weights.DownloadTask while downloading
        self.future: Future | None = None  # the engine being built

    @property
    def state(self) -> str:
        if self.future is not None:
            return LOADING
        return DOWNLOADING if self.download is not None else IDLE

    def ensure_worker(self) -> Any:
        if self.worker is None:
            self.worker = self.worker_factory()
        return self.worker

    def start_download(self, key: str) -> Any:
        """Start downloading the weights ``key`` into the user cache (refused while one runs)."""
        if self.download is not None:
            raise RuntimeError("a download is already running")
        self.download = weights.DownloadTask(key).start()
        return self.download

    def cancel_download(self) -> None:
        if self.download is not None:
            self.download.cancel()

    def start_load(self, request: LoadRequest) -> Future:
        """Build the engine for ``request`` on the inference worker; returns its future."""
        return self.adopt(self.ensure_worker().submit(load_engine, request))

    def adopt(self, future: Future) -> Future:
        """Take an engine future built elsewhere on the worker (the self-test's network)."""
        if self.future is not None:
            raise RuntimeError("a model is already loading")
        self.future = future
        return future

    def poll_download(self, pump: Callable[[], Any] | None, max_s: float) -> list[SetupEvent]:
        """Progress, then at the end how the download went (its task forgotten)."""
        task = self.download
        if task is None:
            return []
        waiting.wait_pumping(task, pump, timeout=max_s)
        events = [SetupEvent("progress", task.done, task.total)] if task.total else []
        if not task.finished or self.download is not task:
            return events
        self.download = None
        if task.error is not None:
            events.append(SetupEvent("download_failed", error=task.error))
        elif task.cancelled:
            events.append(SetupEvent("download_cancelled"))
        else:
            events.append(SetupEvent("downloaded"))
        return events

    def poll_load(self, pump: Callable[[], Any] | None, max_s: float) -> SetupEvent | None:
        """``loaded`` / ``load_failed`` once the engine future is done, else None. A future
        dropped from inside the pump (scene or module closed) reports nothing."""
        future = self.future
        if future is None or not waiting.wait_pumping(future, pump, timeout=max_s):
            return None
        if self.future is not future:
            return None
        self.future = None
        try:
            return SetupEvent("loaded", engine=future.result())
        except Exception as e:  # noqa: BLE001 - shown to the user by the Widget
            logging.exception("FastSAM3D model loading failed")
            return SetupEvent("load_failed", error=e)

    def shutdown(self, keep_worker: bool = False) -> bool:
        """Drop the load, cancel the download, stop the worker unless a logic still uses it.
        Returns whether a load was dropped (the Widget restores its cursor)."""
        loading, self.future = self.future is not None, None
        self.cancel_download()
        if self.worker is not None and not keep_worker:
            self.worker.shutdown()
        return loading


def close_in_background(eng: Any) -> threading.Thread | None:
    """End a remote engine's sessions on the server (frees the volumes there at once, not after
    the server's idle timeout). The network calls run on a daemon thread, so neither the panel
    nor quitting Slicer waits for a slow server. Engines without ``close``: nothing to do."""
    close = getattr(eng, "close", None)
    if close is None:
        return None

    def run() -> None:
        try:
            close()
        except Exception:  # noqa: BLE001 - the server is gone: nothing left to free
            logging.warning("FastSAM3D: could not close the remote sessions")

    thread = threading.Thread(target=run, name="FastSAM3D-close", daemon=True)
    thread.start()
    return thread
