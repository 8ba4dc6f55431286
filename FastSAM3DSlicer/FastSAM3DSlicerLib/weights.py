"""Weights choice, download (progress, cancel, size), removal: a thin layer over fastsam3d.hub.

The hub does the real work (per-user cache, SHA-256 recorded on first download and verified on
every load, atomic moves). This module adds what a GUI needs: the size before downloading, a
download on a background thread whose progress a Qt timer can poll, and cancel.
"""

from __future__ import annotations

import dataclasses
import threading
import urllib.request
from pathlib import Path
from typing import Any

from .engine import LOCAL_FILE, ensure_fastsam3d_importable

DEFAULT_WEIGHTS = "fastsam3d"


@dataclasses.dataclass(frozen=True)
class Choice:
    key: str  # registry name, or LOCAL_FILE
    label: str
    description: str
    license_note: str


def choices() -> list[Choice]:
    """FastSAM3D first (the default), then the other registered weights, then a local file."""
    ensure_fastsam3d_importable()
    from fastsam3d import hub

    labels = {"fastsam3d": "FastSAM3D (fast, default)", "sam-med3d-turbo": "SAM-Med3D-turbo"}
    out = [
        Choice(w.name, labels.get(w.name, w.name), w.description, w.license_note)
        for w in hub.list_weights()
    ]
    out.sort(key=lambda c: c.key != DEFAULT_WEIGHTS)
    out.append(
        Choice(
            LOCAL_FILE,
            "Local checkpoint file...",
            "A .pth / .safetensors file of a FastSAM3D or SAM-Med3D network "
            "(for example one exported by fastsam3d-distill).",
            "",
        )
    )
    return out


def human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


#: How long the Widget waits for the size before asking without it (the request's own timeout
#: does not bound DNS resolution, hence a wait on a thread instead of a blocking call).
SIZE_TIMEOUT_S = 10.0


def remote_size(name_or_url: str, timeout: float = SIZE_TIMEOUT_S) -> int | None:
    """Content-Length of the weights' URL (HEAD request), so the size shows before a download.

    Blocking: call it off the main thread (:class:`SizeProbe`), never from a Slicer callback.
    """
    if "://" in name_or_url:
        url = name_or_url
    else:
        ensure_fastsam3d_importable()
        from fastsam3d.weights import get_weights

        url = get_weights(name_or_url).url
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            value = response.headers.get("Content-Length")
            return int(value) if value is not None else None
    except (OSError, ValueError):
        return None


class SizeProbe:
    """:func:`remote_size` on a daemon thread (review m9: the HEAD request froze the UI).

    ``wait(timeout)`` releases the GIL, so the Widget waits with
    ``waiting.wait_pumping(probe, slicer.app.processEvents, timeout=SIZE_TIMEOUT_S)`` and the
    UI keeps repainting; a probe that outlives the wait (slow DNS) is simply abandoned.
    """

    def __init__(self, name_or_url: str, timeout: float = SIZE_TIMEOUT_S) -> None:
        self.size: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(name_or_url, timeout), name="FastSAM3D-size", daemon=True
        )

    def start(self) -> SizeProbe:
        self._thread.start()
        return self

    def _run(self, name_or_url: str, timeout: float) -> None:
        try:
            self.size = remote_size(name_or_url, timeout)
        except Exception:  # noqa: BLE001 - an unknown size is shown as such
            self.size = None
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


def status_text(name: str) -> str:
    """One line for the panel: downloaded (where, how big, hash) or not."""
    ensure_fastsam3d_importable()
    from fastsam3d import hub

    st = hub.cache_status(name)
    if not st.present:
        return f"Not downloaded (cache: {st.path.parent})"
    if st.error:
        return f"Present but unusable: {st.error}"
    sha = f", SHA-256 {st.recorded_sha256[:12]}..." if st.recorded_sha256 else ""
    return f"Downloaded: {st.path} ({human_size(st.size)}{sha})"


def is_downloaded(name: str) -> bool:
    ensure_fastsam3d_importable()
    from fastsam3d import hub

    st = hub.cache_status(name)
    return st.present and st.error is None


def remove(name: str) -> bool:
    """Delete the downloaded file and its hash record (the 'remove downloaded model' action)."""
    ensure_fastsam3d_importable()
    from fastsam3d import hub

    return hub.remove(name)


class DownloadTask:
    """A download on its own thread; poll ``done``/``total``/``finished`` from a GUI timer.

    I/O, not inference, so it does not use the inference worker (a long download must not
    block a click on an already loaded network).
    """

    def __init__(self, name: str, dest_dir: str | Path | None = None) -> None:
        self.name = name
        self.dest_dir = dest_dir
        self.done = 0
        self.total: int | None = None
        self.path: Path | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"download-{name}", daemon=True)

    def start(self) -> DownloadTask:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def _progress(self, done: int, total: int | None) -> bool:
        self.done, self.total = done, total
        return not self._cancel.is_set()

    def _run(self) -> None:
        try:
            ensure_fastsam3d_importable()
            from fastsam3d import hub

            kwargs: dict[str, Any] = {"progress": False, "progress_callback": self._progress}
            if self.dest_dir is not None:
                kwargs["dest_dir"] = self.dest_dir
            try:
                self.path = hub.download(self.name, **kwargs)
            except hub.DownloadCancelled:
                self.cancelled = True
        except BaseException as e:  # noqa: BLE001 - shown to the user by the Widget
            self.error = e
        finally:
            self._finished.set()
