"""A session on a ``fastsam3d serve`` server, with :class:`fastsam3d.Session`'s interface.

``RemoteSession(url, api_key=...)`` has ``set_volume``, ``add_point``, ``add_box``, ``undo``,
``reset``, ``result`` and ``can_undo`` and returns the same :class:`fastsam3d.Result` objects;
bad prompts raise the same :class:`fastsam3d.SessionError` / :class:`fastsam3d.VolumeError`
with the server-side session's own message. It needs numpy and the standard library only (no
torch), so a Slicer without PyTorch, a laptop or a locked-down PC can use a shared GPU server;
``zstandard`` is used when installed (smaller, faster transfers), zlib otherwise.

The volume is sent once, compressed, in chunks; each click returns only the region it changed.
Runs on Python 3.9 (Slicer 5.8).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from . import wire
from .errors import FastSAM3DError
from .result import Result, SessionError
from .volume import Volume, VolumeError

__all__ = ["RemoteSession", "RemoteEngine", "RemoteError", "SessionExpiredError", "check_server"]

API_KEY_ENV = "FASTSAM3D_API_KEY"


class RemoteError(FastSAM3DError, RuntimeError):
    """The server could not be reached or refused the request (``status``/``code`` say why)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class SessionExpiredError(RemoteError):
    """The server closed this session (idle timeout or restart): start a new one."""


class _Http:
    """One keep-alive connection to the server (http or https), used under a lock."""

    IDLE_RECONNECT_S = 50.0  # the server keeps idle connections 75 s: reconnect before that

    def __init__(
        self, url: str, api_key: str | None, timeout: float, ssl_context: ssl.SSLContext | None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"server URL must look like http://HOST:PORT or https://HOST, got {url!r}"
            )
        self.url = url.rstrip("/")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")  # a server behind a proxy at a sub-path
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.headers = {"Accept": "application/json", "User-Agent": "fastsam3d-remote"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._conn: http.client.HTTPConnection | None = None
        self._last = 0.0
        self.last_headers: Any = None
        self.lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host,
                self.port,
                timeout=self.timeout,
                context=self.ssl_context or ssl.create_default_context(),
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = content_type
        with self.lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                if reused and time.monotonic() - self._last > self.IDLE_RECONNECT_S:
                    self.close()
                    reused = False
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    self._conn.request(method, self.prefix + path, body=body, headers=headers)
                    resp = self._conn.getresponse()
                    data = resp.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                    self.close()
                    if reused and attempt == 0:
                        continue  # the server dropped an idle keep-alive connection: once more
                    raise RemoteError(
                        f"the fastsam3d server at {self.url} closed the "
                        f"connection ({type(e).__name__})"
                    ) from None
                except (OSError, http.client.HTTPException) as e:
                    self.close()
                    raise RemoteError(
                        f"cannot reach the fastsam3d server at {self.url}: {type(e).__name__}: {e}"
                    ) from None
                self._last = time.monotonic()
                self.last_headers = resp.headers
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, method: str, path: str, payload: Any = None, body: bytes | None = None) -> Any:
        """A request whose answer is JSON; server errors become the matching exceptions."""
        if payload is not None:
            body = json.dumps(payload).encode()
            ctype = "application/json"
        else:
            ctype = "application/octet-stream"
        status, data = self.request(method, path, body, ctype)
        if status < 400:
            return json.loads(data) if data else None
        raise _error(status, data, self.url)


def _error(status: int, data: bytes, url: str) -> Exception:
    try:
        err = json.loads(data)
        code, message = str(err["error"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = data[:200].decode("utf-8", "replace").strip()
        return RemoteError(f"HTTP {status} from {url}: {text or 'no details'}", status)
    if code == "session_error":
        return SessionError(message)
    if code == "volume_error":
        return VolumeError(message)
    if code == "session_expired":
        return SessionExpiredError(message, status, code)
    return RemoteError(f"fastsam3d server: {message}", status, code)


def _api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def check_server(
    url: str,
    api_key: str | None = None,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """The connection test: the server answers, is ready and accepts the key.

    Returns the server's readiness (model, device, version) plus its load; raises
    :class:`RemoteError` with the reason otherwise.
    """
    conn = _Http(url, _api_key(api_key), timeout, ssl_context)
    try:
        status, data = conn.request("GET", "/readyz")
        if status != 200:
            raise RemoteError(
                f"the fastsam3d server at {url} is not ready "
                f"({data[:100].decode('utf-8', 'replace')})",
                status,
                "not_ready",
            )
        info = json.loads(data)
        info.update(conn.call("GET", "/v1/stats"))  # needs the key
        return info
    finally:
        conn.close()


class RemoteSession:
    """:class:`fastsam3d.Session` on a server (see the module docstring).

    Same methods and :class:`fastsam3d.Result` objects as a local session (``set_volume``,
    ``add_point``, ``add_box``, ``undo``, ``reset``, ``result``), plus ``close()``; needs numpy
    and the standard library only. Thread-safe: calls are serialised.

    Args:
        url: The server, e.g. ``"https://gpu-host/fastsam3d/"`` (a path prefix is kept).
        api_key: The server's key; default the ``FASTSAM3D_API_KEY`` environment variable.
        point_policy: As for :class:`fastsam3d.Session`; the model, its device and precision
            are the server's.
        max_crops: As for a local session (capped by the server's ``--max-crops``).
        propagate: As for a local session.
        paste_interpolation: As for a local session.
        lattice_anchor: As for a local session.
        timeout: Seconds to wait for one answer (a CPU server's first click in a new crop
            takes a while).
        ssl_context: TLS settings for ``https`` URLs (e.g. a private CA).
        chunk_bytes: Upload chunk size of the compressed volume.

    Raises:
        RemoteError: The server cannot be reached, refuses the key, or is not a fastsam3d
            server. Prompts raise :class:`SessionError` / :class:`VolumeError` with the same
            messages as locally.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        point_policy: str | None = None,
        max_crops: int | None = None,
        propagate: bool = True,
        paste_interpolation: str = "nearest",
        lattice_anchor: str = "centre",
        timeout: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
        chunk_bytes: int = wire.CHUNK_BYTES,
    ) -> None:
        self._http = _Http(url, _api_key(api_key), timeout, ssl_context)
        self.chunk_bytes = int(chunk_bytes)
        options: dict[str, Any] = {
            "propagate": bool(propagate),
            "paste_interpolation": paste_interpolation,
            "lattice_anchor": lattice_anchor,
            "codecs": wire.available_codecs(),
        }
        if point_policy is not None:
            options["point_policy"] = point_policy
        if max_crops is not None:
            options["max_crops"] = int(max_crops)
        self.info: dict[str, Any] = self._http.call("POST", "/v1/sessions", options)
        self.id: str = self.info["session_id"]
        self._path = "/v1/sessions/" + quote(self.id, safe="")
        self.codec: str = self.info["codec"]
        self.volume: Volume | None = None
        self._result: Result | None = None
        self._can_undo = False
        self._closed = False
        # the server's account of the last prompt, ms: wait (lock + queue), infer, encode
        self.last_timing: dict[str, float] = {}

    # --- Session's interface --------------------------------------------------------------
    def set_volume(self, volume: Volume) -> None:
        """Send ``volume`` to the server (compressed, in chunks) and start a new object."""
        if not isinstance(volume, Volume):
            raise TypeError(f"set_volume needs a fastsam3d.Volume, not {type(volume).__name__}")
        array = wire.wire_array(volume.array)
        codec = self.codec if self.codec in wire.available_codecs() else "zlib"
        header = wire.volume_header(array, volume.ijk_to_ras, codec, self.chunk_bytes)
        plan = self._http.call("POST", self._path + "/volume", header)
        sent = 0
        for n, chunk in enumerate(wire.volume_chunks(array, codec, self.chunk_bytes)):
            self._http.call("PUT", f"{self._path}/volume/chunks/{n}", body=chunk)
            sent += 1
        if sent != plan["chunks"]:
            raise RemoteError(f"sent {sent} chunks, the server expected {plan['chunks']}")
        self._http.call("POST", self._path + "/volume/commit", {})
        self.volume = volume
        self._result = None
        self._can_undo = False

    def add_point(self, ras: Sequence[float], positive: bool = True) -> Result:
        """Add a click at RAS position ``ras`` (mm); positive adds, negative removes."""
        return self._op("points", {"ras": _floats(ras), "positive": bool(positive)})

    def add_box(self, ras_min: Sequence[float], ras_max: Sequence[float]) -> Result:
        """Segment the object inside the RAS box [ras_min, ras_max]; starts a new object."""
        return self._op("box", {"ras_min": _floats(ras_min), "ras_max": _floats(ras_max)})

    def undo(self) -> Result:
        """Go back one step (clicks and boxes); repeatable."""
        return self._op("undo", {})

    def reset(self) -> Result:
        """Forget the object (undo history included); the result covers what to clear."""
        return self._op("reset", {})

    @property
    def result(self) -> Result | None:
        return self._result

    @property
    def can_undo(self) -> bool:
        return self._can_undo

    # --- remote only -----------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """The session's state on the server; also keeps it from the idle timeout."""
        return self._http.call("GET", self._path)

    def close(self) -> None:
        """End the session on the server (frees its memory there); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._http.call("DELETE", self._path)
        except RemoteError:
            pass  # already expired, or the server is gone: nothing left to free
        finally:
            self._http.close()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteSession({self._http.url!r}, id={self.id[:8]}...)"

    def _op(self, name: str, payload: dict[str, Any]) -> Result:
        if self._closed:
            raise RemoteError("this remote session was closed")
        data = self._http.call("POST", f"{self._path}/{name}", payload)
        try:
            result = wire.decode_result(data["result"])
        except (KeyError, TypeError) as e:
            raise RemoteError(f"malformed answer from the server: {e}") from None
        self._result = result
        self._can_undo = bool(data.get("can_undo", False))
        self.last_timing = _server_timing(self._http.last_headers)
        return result


def _server_timing(headers: Any) -> dict[str, float]:
    """``Server-Timing: wait;dur=1.2, infer;dur=3.4`` -> {"wait": 1.2, "infer": 3.4}."""
    out: dict[str, float] = {}
    for part in (headers.get("Server-Timing", "") if headers is not None else "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        try:
            out[name] = float(dur)
        except ValueError:
            continue
    return out


def _floats(p: Sequence[float]) -> list:
    """A point as JSON numbers (any length: the server's session names a wrong one)."""
    return [float(x) for x in np.asarray(p, dtype=np.float64).reshape(-1)]


class RemoteEngine:
    """The Slicer Lib's engine interface (``device``, ``new_session()``, ``make_volume()``) on a
    server: a drop-in for its local engine, so the module's logic does not change.

    Checks the server (and key) at construction; ``close()`` ends every session it made.
    """

    def __init__(self, url: str, api_key: str | None = None, **session_options: Any) -> None:
        self.url, self.api_key = url, api_key
        self.session_options = session_options
        self.server = check_server(url, api_key)
        self.device = f"{self.server.get('device', '?')} on {urlsplit(url).hostname}"
        self._sessions: list[RemoteSession] = []

    def new_session(self) -> RemoteSession:
        s = RemoteSession(self.url, self.api_key, **self.session_options)
        self._sessions = [x for x in self._sessions if not x._closed] + [s]
        return s

    def make_volume(self, array_kji: Any, ijk_to_ras: Any) -> Volume:
        return Volume(array_kji, ijk_to_ras)

    def close(self) -> None:
        for s in self._sessions:
            s.close()
        self._sessions = []
