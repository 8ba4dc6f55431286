"""Where FastSAM3D runs for the module: local PyTorch, local ONNX Runtime, or a remote server.

Each backend builds an engine with the interface the Lib uses (``device``, ``device_info``,
``new_session()``, ``make_volume()``), so :class:`logic.InteractiveLogic` does not change, and
each names only the Python packages it needs, so the install step asks for nothing else:

- ``local``: PyTorch (through the PyTorch extension) + tqdm/safetensors (``deps``).
- ``remote``: numpy (bundled with Slicer) + zstandard; no torch is installed or imported on this
  path (``fastsam3d.remote`` is torch-free).
- ``onnx``: onnxruntime + onnx + numpy, no torch; offered only when the bundled fastsam3d can
  run a session without PyTorch (:func:`onnx_status`).

The choice, the server URL and "remember the key" are per-user preferences (QSettings in
Slicer). The API key is kept in memory only, unless the user ticks "remember": then it is
stored in the user's QSettings file (plain text, like any QSettings value). It is never written
into the scene, a log line, a message or a ``repr``. Runs on Python 3.9 (Slicer 5.8).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any
from urllib.parse import urlsplit

from . import deps
from .engine import DeviceInfo, RunnerEngine
from .errors import FastSAM3DSlicerError

LOCAL, ONNX, REMOTE = "local", "onnx", "remote"
#: (key, label) in the order the panel lists them.
CHOICES = (
    (LOCAL, "Local (PyTorch)"),
    (ONNX, "Local without PyTorch (ONNX Runtime)"),
    (REMOTE, "Remote server"),
)
KINDS = tuple(k for k, _ in CHOICES)

_PREFIX = "FastSAM3DSlicer/"
KIND_KEY = _PREFIX + "backend"
URL_KEY = _PREFIX + "serverUrl"
REMEMBER_KEY = _PREFIX + "rememberApiKey"
API_KEY_KEY = _PREFIX + "apiKey"  # written only while "remember" is ticked

# What each torch-free backend needs besides the bundled fastsam3d (floors only, as in deps).
REMOTE_REQUIREMENTS = ("numpy>=1.21", "zstandard>=0.22")
ONNX_REQUIREMENTS = ("numpy>=1.21", "onnxruntime>=1.17", "onnx>=1.16", "tqdm>=4.60")

#: The name ``fastsam3d.onnx`` sets to True once a ``fastsam3d.Session`` can run on ONNX Runtime
#: without PyTorch; with it, ``fastsam3d.onnx.torch_free_runner(path)`` makes the runner.
ONNX_FLAG = "TORCH_FREE_SESSION"


class BackendError(FastSAM3DSlicerError, RuntimeError):
    """A backend cannot be used as configured; the message is for the user."""


# -- settings ------------------------------------------------------------------------------


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.lower() in ("true", "1")


@dataclasses.dataclass
class BackendSettings:
    """The user's backend choice. ``api_key`` lives in memory unless ``remember_key``."""

    kind: str = LOCAL
    url: str = ""
    api_key: str = dataclasses.field(default="", repr=False)
    remember_key: bool = False

    @classmethod
    def load(cls, store: Any) -> BackendSettings:
        """Read from ``store`` (QSettings-like ``value``/``setValue``); unknown values fall back."""
        kind = store.value(KIND_KEY)
        remember = _as_bool(store.value(REMEMBER_KEY))
        key = store.value(API_KEY_KEY) if remember else None
        return cls(
            kind=str(kind) if kind in KINDS else LOCAL,
            url=str(store.value(URL_KEY) or ""),
            api_key=str(key or ""),
            remember_key=remember,
        )

    def save(self, store: Any) -> None:
        """Write the choice; the key only when ``remember_key``, else any stored key is removed."""
        store.setValue(KIND_KEY, self.kind)
        store.setValue(URL_KEY, self.url)
        store.setValue(REMEMBER_KEY, "true" if self.remember_key else "false")
        if self.remember_key and self.api_key:
            store.setValue(API_KEY_KEY, self.api_key)
        elif hasattr(store, "remove"):
            store.remove(API_KEY_KEY)
        else:
            store.setValue(API_KEY_KEY, "")


# -- dependencies per backend --------------------------------------------------------------


def requirements(kind: str) -> list[deps.Requirement]:
    """The packages ``kind`` needs, with what is installed now (from metadata, no imports)."""
    if kind == LOCAL:
        return [deps.torch_requirement(), *deps.pip_requirements()]
    specs = REMOTE_REQUIREMENTS if kind == REMOTE else ONNX_REQUIREMENTS
    if kind not in KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(KINDS)}")
    out = []
    for name, spec in map(deps.parse, specs):
        out.append(deps.Requirement(name, spec, deps._installed(name)))
    return out


def missing(kind: str) -> list[deps.Requirement]:
    """What ``kind`` needs and is not installed (the install step asks for exactly these)."""
    return [r for r in requirements(kind) if not r.satisfied]


def needs_torch(kind: str) -> bool:
    return kind == LOCAL


# -- the ONNX Runtime backend --------------------------------------------------------------


def onnx_status() -> tuple[bool, str]:
    """(usable, why not): the ONNX backend is offered only when it can run without torch."""
    from .engine import ensure_fastsam3d_importable

    try:
        ensure_fastsam3d_importable()
        onnx_pkg = importlib.import_module("fastsam3d.onnx")  # imports nothing heavy
    except ImportError as e:
        return False, f"the bundled fastsam3d has no ONNX engine ({e})"
    if not getattr(onnx_pkg, ONNX_FLAG, False):
        return False, (
            "this version of fastsam3d cannot run a session without PyTorch yet "
            "(its ONNX Runtime engine still needs PyTorch around it)"
        )
    if importlib.util.find_spec("onnxruntime") is None:
        return True, "onnxruntime is not installed yet (Install... adds it, no PyTorch)"
    return True, ""


class OnnxBackendEngine(RunnerEngine):
    """The Lib's engine on fastsam3d's torch-free ONNX Runtime runner."""

    def __init__(
        self, weights_path: str, config: str | None = None, **session_options: Any
    ) -> None:
        import fastsam3d
        import fastsam3d.onnx as fonnx

        self._fastsam3d = fastsam3d
        # config: the chosen weights entry's (sam-med3d-turbo-fastsam3d-block shares its file
        # with sam-med3d-turbo; the block style is not in the file)
        self.runner = fonnx.torch_free_runner(weights_path, config=config)
        providers = getattr(self.runner, "providers", None) or {}
        provider = str(providers.get("encoder", "CPUExecutionProvider"))
        is_cpu = provider == "CPUExecutionProvider"
        self.device = "cpu" if is_cpu else provider.replace("ExecutionProvider", "").lower()
        self.device_info = DeviceInfo(self.device, f"ONNX Runtime ({provider})", is_cpu)
        self.session_options = session_options
        self._warmed = False

    def close(self) -> None:
        pass


# -- the remote backend --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConnectionReport:
    """What "Test connection" found: ``ok`` and a message for the panel (never the key)."""

    ok: bool
    message: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _release(version: str) -> tuple[int, ...]:
    return deps._version_tuple(str(version))


def compatible(client: str, server: str) -> bool:
    """Whether a client of fastsam3d ``client`` speaks ``server``'s protocol: the same major
    version (the same major.minor while the major is 0, where minors may break it)."""
    c, s = _release(client), _release(server)
    if not c or not s:
        return False
    width = 2 if c[0] == 0 or s[0] == 0 else 1
    return (c + (0,))[:width] == (s + (0,))[:width]


def normalise_url(url: str) -> str:
    """``host:8000`` -> ``http://host:8000``; raises BackendError for what cannot be a URL."""
    text = (url or "").strip()
    if not text:
        raise BackendError("enter the server's URL, e.g. http://gpu-host:8000")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise BackendError(f"{url!r} is not a server URL (bad port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"{url!r} is not a server URL; use http://HOST:PORT or https://HOST")
    return text.rstrip("/")


def check_connection(url: str, api_key: str | None, timeout: float = 10.0) -> ConnectionReport:
    """The panel's "Test connection": reachable, a fastsam3d server, ready, key accepted,
    a compatible version. Never raises for a server-side problem; the message says which."""
    from .engine import ensure_fastsam3d_importable

    try:
        url = normalise_url(url)
    except BackendError as e:
        return ConnectionReport(False, str(e))
    ensure_fastsam3d_importable()
    import fastsam3d
    from fastsam3d.remote import RemoteError, check_server

    try:
        info = check_server(url, api_key or None, timeout=timeout)
    except RemoteError as e:
        return ConnectionReport(False, _explain(url, e, bool(api_key)))
    except (ValueError, KeyError, TypeError):  # an answer that is not fastsam3d's JSON
        return ConnectionReport(False, _not_ours(url))
    if not isinstance(info, dict) or "version" not in info or "model" not in info:
        return ConnectionReport(False, _not_ours(url))
    if not compatible(fastsam3d.__version__, str(info["version"])):
        return ConnectionReport(
            False,
            f"version mismatch: the server at {url} runs fastsam3d {info['version']}, "
            f"this module {fastsam3d.__version__}; update the older one",
            info,
        )
    sessions = info.get("sessions")
    load = f", {sessions} session(s) open" if sessions is not None else ""
    return ConnectionReport(
        True,
        f"connected: {info['model']} on {info.get('device', '?')} "
        f"(fastsam3d {info['version']}{load})",
        info,
    )


def _not_ours(url: str) -> str:
    return f"{url} answers, but it is not a fastsam3d server (no /readyz or /v1 API there)"


def _explain(url: str, e: Any, have_key: bool) -> str:
    status, code = getattr(e, "status", None), getattr(e, "code", None)
    text = str(e)
    if status is None:
        return f"unreachable: {text}"
    if status == 401:
        return (
            "wrong API key: the server refused it"
            if have_key
            else "the server needs an API key: enter it and test again"
        )
    if status == 503:
        for why in ("warming up", "full", "shutting down"):
            if why in text:
                return f"the server at {url} is {why}; try again in a moment"
        return f"the server at {url} is not ready: {text}"
    if code == "not_ready" or status in (404, 405):
        return _not_ours(url)
    return f"the server at {url} answered HTTP {status}: {text}"


class RemoteBackendEngine:
    """The Lib's engine on a ``fastsam3d serve`` server (``fastsam3d.remote.RemoteEngine``),
    with the ``device_info`` the panel shows. Needs no torch."""

    def __init__(self, url: str, api_key: str | None, **session_options: Any) -> None:
        from fastsam3d.remote import RemoteEngine

        self._remote = RemoteEngine(url, api_key or None, **session_options)
        server = self._remote.server
        self.server = {k: v for k, v in server.items() if k != "api_key"}
        self.device = str(server.get("device", "?"))
        host = urlsplit(url).hostname
        self.device_info = DeviceInfo(
            self.device,
            f"{server.get('model', '?')} on {self.device} at {host} (remote)",
            self.device == "cpu",
        )

    def new_session(self) -> Any:
        return self._remote.new_session()

    def make_volume(self, array_kji: Any, ijk_to_ras: Any) -> Any:
        return self._remote.make_volume(array_kji, ijk_to_ras)

    def close(self) -> None:
        """End every session this engine opened on the server (frees its memory there)."""
        self._remote.close()


# -- building --------------------------------------------------------------------------------


def build_engine(
    settings: BackendSettings,
    weights: str = "fastsam3d",
    device: str = "auto",
    local_path: str | None = None,
    **session_options: Any,
) -> Any:
    """The engine for ``settings`` (runs on the worker thread, like the local load).

    ``local``: :meth:`engine.FastSAM3DEngine.load`. ``remote``: the connection test first,
    so a wrong key or an old server is a clear :class:`BackendError`. ``onnx``: refused with
    the reason while :func:`onnx_status` says it cannot run.
    """
    if settings.kind == LOCAL:
        from .engine import FastSAM3DEngine

        return FastSAM3DEngine.load(weights, device, local_path)
    if settings.kind == REMOTE:
        report = check_connection(settings.url, settings.api_key)
        if not report.ok:
            raise BackendError(report.message)
        return RemoteBackendEngine(normalise_url(settings.url), settings.api_key, **session_options)
    if settings.kind == ONNX:
        usable, why = onnx_status()
        if not usable or why:
            raise BackendError(f"ONNX Runtime backend unavailable: {why}")
        from .engine import LOCAL_FILE

        if weights == LOCAL_FILE:
            path, config = local_path, None
        else:
            from fastsam3d.weights import get_weights

            path, config = _cached_weights(weights), get_weights(weights).config
        if not path:
            raise BackendError("choose a checkpoint file for 'Local file'")
        return OnnxBackendEngine(str(path), config, **session_options)
    raise BackendError(f"unknown backend {settings.kind!r}")


def _cached_weights(weights: str) -> str:
    from fastsam3d import hub

    path = hub.cached_path(weights)
    if path is None:
        raise BackendError(f"the {weights!r} weights are not downloaded yet; press Download first")
    return str(path)
