"""Sessions of one server process and the single queue that runs their network work.

Every torch call of every session (``Session`` construction, ``set_volume``, clicks, boxes,
undo, reset) runs on ONE worker thread, first come first served. The sessions share one prepared
:class:`fastsam3d.fastpath.Runner`, whose CUDA graphs use static buffers: one thread at a time is
what makes sharing it safe, and it keeps CUDA-graph capture away from other threads' CUDA calls.
Each session also has its own lock, so one session never has more than one job queued: with the
FIFO queue that is round-robin across sessions (a user who clicks fast cannot starve the others;
everyone waits at most one job per other active session). Decompression, validation of uploads
and encoding of results run off the worker, on other threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import FastSAM3DError
from ..wire import VolumeAssembler

log = logging.getLogger("fastsam3d.serve")


class ApiError(FastSAM3DError):
    """An error the client gets as HTTP ``status`` with ``{"error": code, "message": ...}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class ServerConfig:
    """What the operator decides; nothing here can be changed by a request."""

    model_name: str = "fastsam3d"
    api_key: str | None = None
    max_sessions: int = 32
    idle_timeout_s: float = 1800.0
    max_upload_mb: float = 1024.0
    max_crops: int = 8  # the most a session may ask for
    instance: str = ""  # prefix of session ids (routing by a load balancer / one per GPU)
    warmup: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class InferenceQueue:
    """One worker thread; jobs run in submission order (see the module docstring)."""

    def __init__(
        self, name: str = "fastsam3d-infer", init: Callable[[], object] | None = None
    ) -> None:
        self._init = init  # runs first on the worker (e.g. select its CUDA device)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.jobs = 0
        self.busy_s = 0.0
        self.pending = 0
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.pending += 1
        self._q.put((fut, fn, args))
        return fut

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker and await its result (exceptions propagate)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def stop(self, timeout: float | None = None) -> None:
        """Finish every job already queued, then end the worker thread."""
        if self._started:
            self._q.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args = item
            self.pending -= 1
            if not fut.set_running_or_notify_cancel():
                continue  # the request went away before its turn
            t0 = time.perf_counter()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                fut.set_exception(e)
            finally:
                self.busy_s += time.perf_counter() - t0
                self.jobs += 1


@dataclass(eq=False)
class ServerSession:
    id: str
    session: Any  # fastsam3d.Session; None once closed
    codec: str
    options: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    upload: VolumeAssembler | None = None
    closed: str | None = None  # why, once closed

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionManager:
    """Creates, finds, closes and evicts sessions; all methods run on the event loop thread."""

    TOMBSTONES = 10000  # closed ids remembered, so their clients learn why

    def __init__(self, runner: Any, config: ServerConfig, jobs: InferenceQueue) -> None:
        self.runner = runner
        self.config = config
        self.jobs = jobs
        self.sessions: dict[str, ServerSession] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._creating = 0
        self.clicks = 0

    def _new_id(self) -> str:
        token = secrets.token_urlsafe(18)
        return f"{self.config.instance}.{token}" if self.config.instance else token

    async def create(self, options: dict[str, Any], codec: str) -> ServerSession:
        cfg = self.config
        if len(self.sessions) + self._creating >= cfg.max_sessions:
            raise ApiError(
                503,
                "server_full",
                f"the server already holds its maximum of {cfg.max_sessions} "
                "sessions; close one (or wait for idle ones to expire) and retry",
            )
        crops = options.get("max_crops", cfg.max_crops)
        if not 1 <= crops <= cfg.max_crops:
            raise ApiError(
                422,
                "malformed",
                f"max_crops must be between 1 and the server's limit {cfg.max_crops}, got {crops}",
            )
        from ..session import Session

        self._creating += 1
        try:
            session = await self.jobs.run(lambda: Session(self.runner, warmup=False, **options))
        except ValueError as e:  # an option Session refuses
            raise ApiError(422, "malformed", str(e)) from None
        finally:
            self._creating -= 1
        s = ServerSession(self._new_id(), session, codec, dict(options))
        self.sessions[s.id] = s
        log.info("session %s created (%d open)", short(s.id), len(self.sessions))
        return s

    def get(self, sid: str) -> ServerSession:
        s = self.sessions.get(sid)
        if s is not None:
            return s
        why = self._closed.get(sid)
        if why is not None:
            raise ApiError(
                410,
                "session_expired",
                f"session {short(sid)} {why}; create a new session and send the volume again",
            )
        raise ApiError(
            404,
            "unknown_session",
            f"no session {short(sid)} on this server (wrong id, or the server restarted)",
        )

    def close(self, s: ServerSession, why: str) -> None:
        if s.closed:
            return
        s.closed = why
        self.sessions.pop(s.id, None)
        self._closed[s.id] = why
        while len(self._closed) > self.TOMBSTONES:
            self._closed.popitem(last=False)
        s.upload = None
        # release its tensors on the worker thread, after any job of it still queued
        self.jobs.submit(_drop, s)
        log.info("session %s %s (%d open)", short(s.id), why, len(self.sessions))

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle longer than the timeout (never one with a request running)."""
        now = time.monotonic() if now is None else now
        limit = self.config.idle_timeout_s
        gone = [
            s for s in self.sessions.values() if now - s.last_used > limit and not s.lock.locked()
        ]
        for s in gone:
            self.close(
                s, f"was closed after {limit:.0f} s without requests (the server's idle timeout)"
            )
        return [s.id for s in gone]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sessions": len(self.sessions),
            "max_sessions": self.config.max_sessions,
            "queued": self.jobs.pending,
            "jobs": self.jobs.jobs,
            "clicks": self.clicks,
            "busy_s": round(self.jobs.busy_s, 3),
            "rss_mb": rss_mb(),
            "peak_rss_mb": rss_mb(True),
        }
        dev = getattr(self.runner, "device", None)
        if dev is not None and dev.type == "cuda":
            import torch

            out["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(dev) / 2**20, 1)
            out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            out["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(dev) / 2**20, 1)
        return out


def _drop(s: ServerSession) -> None:
    s.session = None


def short(sid: str) -> str:
    """A session id as logged: enough to correlate, not enough to use it."""
    return sid[: sid.find(".") + 7] if "." in sid else sid[:6]


def rss_mb(peak: bool = False) -> float | None:
    """Resident memory of this process in MB (Linux /proc; else the peak from getrusage)."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(key):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):
        return None
