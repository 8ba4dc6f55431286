"""The HTTP API of ``fastsam3d serve`` (FastAPI; OpenAPI description at ``/openapi.json``).

Routes (all under ``/v1`` need the API key when the server has one: ``Authorization: Bearer
KEY`` or ``X-API-Key: KEY``):

* ``POST /v1/sessions`` -> a session id (options: the per-object ``Session`` options only;
  no request can name a model, a checkpoint or a file);
* ``POST /v1/sessions/{id}/volume`` (JSON header), ``PUT .../volume/chunks/{n}`` (compressed
  bytes), ``POST .../volume/commit``: the volume, once, in chunks (:mod:`fastsam3d.wire`);
* ``POST .../points``, ``.../box``, ``.../undo``, ``.../reset`` -> the changed region of the
  mask (:func:`fastsam3d.wire.encode_result`);
* ``GET /v1/sessions/{id}`` (heartbeat + state), ``DELETE /v1/sessions/{id}``, ``GET /v1/stats``;
* ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is warm and the server
  is not shutting down): no key, for load balancers.

Errors are ``{"error": code, "message": text}``: 401 ``unauthorized``, 404 ``unknown_session``,
410 ``session_expired``, 413 ``too_large``, 422 ``session_error`` / ``volume_error`` /
``malformed``, 503 ``server_full`` / ``not_ready``. ``session_error`` and ``volume_error`` carry
the local session's own message, and the client raises the local exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..result import Result, SessionError
from ..volume import Volume, VolumeError
from ..wire import (
    MAX_CHUNK_BYTES,
    VolumeAssembler,
    WireError,
    available_codecs,
    encode_result,
    pick_codec,
)
from .bodies import BodyLimit, Box, Point, SessionOptions, VolumeHeader
from .manager import ApiError, InferenceQueue, ServerConfig, ServerSession, SessionManager, short

log = logging.getLogger("fastsam3d.serve")

INLINE_ENCODE_VOXELS = 2_000_000  # bigger result regions are encoded off the event loop


# --- the app -----------------------------------------------------------------------------
def create_app(runner: Any, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app around one prepared :class:`fastsam3d.fastpath.Runner`."""
    config = config or ServerConfig()
    init = None
    dev = getattr(runner, "device", None)
    if dev is not None and dev.type == "cuda" and dev.index is not None:
        import torch

        # the CUDA device is per thread: the worker must use the runner's (cuda:1 ...)
        def init() -> None:
            torch.cuda.set_device(runner.device)

    jobs = InferenceQueue(init=init)
    manager = SessionManager(runner, config, jobs)
    state: dict[str, Any] = {"ready": False, "draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        if config.warmup:
            # "accumulate" models (SAM-Med3D) send every click: prepare each point count's graph
            cfg = getattr(runner.model, "config", None)
            many = getattr(cfg, "point_policy", None) == "accumulate"
            points = tuple(range(1, runner.max_graph_points + 1)) if many else (1,)
            secs = await jobs.run(lambda: runner.warmup(points=points))
            log.info("model %s warm on %s in %.1f s", config.model_name, runner.device, secs)
        state["ready"] = True
        evictor = asyncio.create_task(_evict_loop(manager))
        try:
            yield
        finally:
            state["ready"], state["draining"] = False, True
            evictor.cancel()
            # uvicorn has already let the in-flight requests finish; this finishes queued jobs
            await anyio.to_thread.run_sync(jobs.stop)
            log.info("stopped (%d sessions dropped)", len(manager.sessions))

    app = FastAPI(
        title="fastsam3d serve",
        version=__version__,
        lifespan=lifespan,
        description="Interactive 3D segmentation (FastSAM3D / SAM-Med3D) for many "
        "users on one GPU. See docs/serve.md.",
    )
    app.state.manager = manager
    app.state.jobs = jobs
    app.add_middleware(BodyLimit, chunk_limit=MAX_CHUNK_BYTES + MAX_CHUNK_BYTES // 64 + 4096)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500 or exc.status in (401, 413):
            log.warning("%s %s -> %d %s", request.method, _path(request), exc.status, exc.code)
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # e.g. CUDA out of memory: the session's state is unchanged (it commits on success)
        log.error(
            "%s %s -> 500 %s: %s",
            request.method,
            _path(request),
            type(exc).__name__,
            str(exc)[:200],
        )
        return JSONResponse(
            {
                "error": "internal",
                "message": f"the server failed: {type(exc).__name__}: {str(exc)[:300]}",
            },
            status_code=500,
        )

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts, extra = [], False
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
            extra = extra or e.get("type") == "extra_forbidden"
        msg = "malformed request: " + "; ".join(parts)
        if extra:
            msg += (
                " (the server's model and files are fixed by its operator; a request "
                "cannot name them)"
            )
        return JSONResponse({"error": "malformed", "message": msg}, status_code=422)

    async def require_key(request: Request) -> None:  # async: no thread-pool hop per request
        key = config.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer KEY')"
            )

    auth = [Depends(require_key)]

    # --- health --------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        if not state["ready"]:
            why = "shutting down" if state["draining"] else "warming up"
            return JSONResponse({"status": why}, status_code=503)
        if len(manager.sessions) >= config.max_sessions:
            return JSONResponse({"status": "full"}, status_code=503)
        return JSONResponse(
            {
                "status": "ready",
                "model": config.model_name,
                "device": str(runner.device),
                "version": __version__,
            }
        )

    # --- sessions ------------------------------------------------------------------------
    def _info(s: ServerSession) -> dict[str, Any]:
        sess = s.session
        vol = getattr(sess, "volume", None)
        return {
            "session_id": s.id,
            "model": config.model_name,
            "device": str(runner.device),
            "codec": s.codec,
            "idle_timeout_s": config.idle_timeout_s,
            "max_upload_mb": config.max_upload_mb,
            "max_crops": sess.max_crops,
            "point_policy": sess.point_policy,
            "volume": None if vol is None else list(vol.shape),
            "can_undo": bool(sess.can_undo),
        }

    @app.post("/v1/sessions", status_code=201, dependencies=auth, tags=["sessions"])
    async def create_session(options: SessionOptions | None = None) -> dict[str, Any]:
        if not state["ready"]:
            raise ApiError(
                503, "not_ready", "the server is not ready (warming up or shutting down)"
            )
        opts = (options or SessionOptions()).model_dump()
        try:
            codec = pick_codec(opts.pop("codecs"))
        except WireError as e:
            raise ApiError(422, "malformed", str(e)) from None
        opts = {k: v for k, v in opts.items() if v is not None}
        s = await manager.create(opts, codec)
        return _info(s)

    async def locked(sid: str) -> ServerSession:
        s = manager.get(sid)
        await s.lock.acquire()
        if s.closed:  # closed while this request waited for the lock
            s.lock.release()
            manager.get(sid)  # raises the right error
        s.touch()
        return s

    @app.get("/v1/sessions/{sid}", dependencies=auth, tags=["sessions"])
    async def session_info(sid: str) -> dict[str, Any]:
        s = manager.get(sid)
        s.touch()
        return _info(s)

    @app.delete("/v1/sessions/{sid}", status_code=204, dependencies=auth, tags=["sessions"])
    async def close_session(sid: str) -> Response:
        s = await locked(sid)
        try:
            manager.close(s, "was closed by its client")
        finally:
            s.lock.release()
        return Response(status_code=204)

    # --- volume upload -------------------------------------------------------------------
    @app.post("/v1/sessions/{sid}/volume", dependencies=auth, tags=["volume"])
    async def begin_volume(sid: str, header: VolumeHeader) -> dict[str, Any]:
        s = await locked(sid)
        try:
            s.upload = None
            try:
                s.upload = await anyio.to_thread.run_sync(
                    VolumeAssembler,
                    header.model_dump(),
                    config.max_upload_bytes,
                    available_codecs(),
                )
            except OverflowError as e:
                raise ApiError(413, "too_large", str(e)) from None
            except MemoryError:
                raise ApiError(
                    503,
                    "server_full",
                    "the server has not enough memory for this volume now; retry later",
                ) from None
            except WireError as e:
                raise ApiError(422, "malformed", f"volume header: {e}") from None
            log.info(
                "session %s: receiving a volume %s %s (%.1f MB, %d chunks)",
                short(sid),
                s.upload.shape,
                s.upload.dtype,
                s.upload.nbytes / 2**20,
                s.upload.chunks,
            )
            return {"chunks": s.upload.chunks, "chunk_bytes": s.upload.chunk_bytes}
        finally:
            s.lock.release()

    @app.put(
        "/v1/sessions/{sid}/volume/chunks/{index}",
        dependencies=auth,
        tags=["volume"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def volume_chunk(sid: str, index: int, request: Request) -> dict[str, Any]:
        s = await locked(sid)
        try:
            up = s.upload
            if up is None:
                raise ApiError(
                    422, "malformed", "no volume upload in progress: POST the volume header first"
                )
            try:
                size = up.chunk_size(index)
            except WireError as e:
                raise ApiError(422, "malformed", str(e)) from None
            cap = size + size // 64 + 4096  # zstd/zlib worst case is well inside this
            declared = request.headers.get("content-length")
            if declared is not None and int(declared) > cap:
                raise ApiError(
                    413,
                    "too_large",
                    f"chunk {index}: {declared} bytes for {size} bytes of volume data",
                )
            data = await request.body()
            if len(data) > cap:
                raise ApiError(
                    413,
                    "too_large",
                    f"chunk {index}: {len(data)} bytes for {size} bytes of volume data",
                )
            try:
                await anyio.to_thread.run_sync(up.add, index, data)
            except WireError as e:
                raise ApiError(422, "malformed", f"chunk {index}: {e}") from None
            return {"missing": len(up.missing)}
        finally:
            s.lock.release()

    @app.post("/v1/sessions/{sid}/volume/commit", dependencies=auth, tags=["volume"])
    async def commit_volume(sid: str) -> dict[str, Any]:
        s = await locked(sid)
        try:
            up = s.upload
            if up is None:
                raise ApiError(422, "malformed", "no volume upload in progress")
            try:
                vol = await anyio.to_thread.run_sync(lambda: Volume(up.array(), up.ijk_to_ras))
            except WireError as e:
                raise ApiError(422, "malformed", str(e)) from None
            except VolumeError as e:
                raise ApiError(422, "volume_error", str(e)) from None
            try:
                await manager.jobs.run(s.session.set_volume, vol)
            except VolumeError as e:
                raise ApiError(422, "volume_error", str(e)) from None
            s.upload = None
            log.info("session %s: volume %s ready", short(sid), vol.shape)
            return {"volume": list(vol.shape), "can_undo": False}
        finally:
            s.lock.release()

    # --- prompts -------------------------------------------------------------------------
    async def operate(sid: str, op: Callable[[Any], Result]) -> Response:
        t0 = time.perf_counter()
        s = await locked(sid)
        span: list[float] = []

        def job(session: Any) -> Result:
            span.append(time.perf_counter())
            try:
                return op(session)
            finally:
                span.append(time.perf_counter())

        try:
            try:
                result = await manager.jobs.run(job, s.session)
            except SessionError as e:
                raise ApiError(422, "session_error", str(e)) from None
            except VolumeError as e:
                raise ApiError(422, "volume_error", str(e)) from None
            can_undo = bool(s.session.can_undo)
            manager.clicks += 1
        finally:
            s.lock.release()
        t1 = time.perf_counter()
        if math.prod(result.mask.shape) > INLINE_ENCODE_VOXELS:
            payload = await anyio.to_thread.run_sync(encode_result, result, s.codec)
        else:
            payload = encode_result(result, s.codec)
        body = json.dumps({"result": payload, "can_undo": can_undo}).encode()
        t2 = time.perf_counter()
        # where the time went, for clients and load tests (RemoteSession.last_timing)
        timing = (
            f"wait;dur={(span[0] - t0) * 1e3:.2f}, infer;dur={(span[1] - span[0]) * 1e3:.2f}"
            f", encode;dur={(t2 - t1) * 1e3:.2f}"
        )
        return Response(body, media_type="application/json", headers={"Server-Timing": timing})

    @app.post("/v1/sessions/{sid}/points", dependencies=auth, tags=["prompts"])
    async def add_point(sid: str, point: Point) -> Response:
        return await operate(sid, lambda sess: sess.add_point(point.ras, point.positive))

    @app.post("/v1/sessions/{sid}/box", dependencies=auth, tags=["prompts"])
    async def add_box(sid: str, box: Box) -> Response:
        return await operate(sid, lambda sess: sess.add_box(box.ras_min, box.ras_max))

    @app.post("/v1/sessions/{sid}/undo", dependencies=auth, tags=["prompts"])
    async def undo(sid: str) -> Response:
        return await operate(sid, lambda sess: sess.undo())

    @app.post("/v1/sessions/{sid}/reset", dependencies=auth, tags=["prompts"])
    async def reset(sid: str) -> Response:
        return await operate(sid, lambda sess: sess.reset())

    @app.get("/v1/stats", dependencies=auth, tags=["health"])
    async def stats() -> dict[str, Any]:
        return manager.stats()

    return app


def _path(request: Request) -> str:
    """The route with session ids shortened (logs never hold a usable id)."""
    parts = request.url.path.split("/")
    if len(parts) > 3 and parts[1:3] == ["v1", "sessions"]:
        parts[3] = short(parts[3])
    return "/".join(parts)


async def _evict_loop(manager: SessionManager) -> None:
    period = max(0.05, min(30.0, manager.config.idle_timeout_s / 4))
    while True:
        await asyncio.sleep(period)
        manager.evict_idle()
