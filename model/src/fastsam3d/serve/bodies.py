"""What a request to ``fastsam3d serve`` may carry: the JSON bodies (unknown fields refused, so
no request can name a model, a checkpoint or a file) and the body-size guard that answers 413
before any route reads a byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..wire import CODECS

__all__ = ["JSON_BODY_LIMIT", "BodyLimit", "Box", "Point", "SessionOptions", "VolumeHeader"]

JSON_BODY_LIMIT = 64 * 1024


# --- request bodies (unknown fields are refused: a request cannot name a model or a path) --
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionOptions(_Body):
    point_policy: Literal["newest", "accumulate"] | None = None
    max_crops: int | None = Field(None, ge=1)
    propagate: bool = True
    paste_interpolation: Literal["nearest", "linear"] = "nearest"
    lattice_anchor: Literal["centre", "corner"] = "centre"
    codecs: list[str] = Field(default_factory=lambda: list(CODECS), max_length=8)


class VolumeHeader(_Body):
    shape: list[int] = Field(..., max_length=8)
    dtype: str = Field(..., max_length=8)
    ijk_to_ras: list[list[float]] = Field(..., max_length=8)
    codec: str = Field(..., max_length=16)
    chunk_bytes: int


class Point(_Body):
    ras: list[float] = Field(..., max_length=16)  # any length: the session names a wrong one
    positive: bool = True


class Box(_Body):
    ras_min: list[float] = Field(..., max_length=16)
    ras_max: list[float] = Field(..., max_length=16)


# --- the body-size guard (before any route reads a byte) ---------------------------------
class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is sent.

    Chunk uploads may carry one compressed chunk; every other request is small JSON. A body
    without Content-Length (chunked transfer) is read here up to the limit, then handed on.
    """

    def __init__(self, app: Any, chunk_limit: int) -> None:
        self.app = app
        self.chunk_limit = chunk_limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunk = scope["method"] == "PUT" and "/volume/chunks/" in scope["path"]
        limit = self.chunk_limit if chunk else JSON_BODY_LIMIT
        what = "a volume chunk" if chunk else "a request"
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0 or n > limit:
                await _send_error(
                    send,
                    413,
                    "too_large",
                    f"{what} of {length.decode(errors='replace')} bytes exceeds "
                    f"the limit of {limit} bytes",
                )
                return
            await self.app(scope, receive, send)  # the HTTP layer enforces Content-Length
            return
        parts, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            body = msg.get("body", b"")
            total += len(body)
            if total > limit:
                await _send_error(
                    send, 413, "too_large", f"{what} exceeds the limit of {limit} bytes"
                )
                return
            parts.append(body)
            if not msg.get("more_body", False):
                break
        buffered = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replay() -> dict:
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)


async def _send_error(send: Callable, status: int, code: str, message: str) -> None:
    resp = JSONResponse({"error": code, "message": message}, status_code=status)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}
