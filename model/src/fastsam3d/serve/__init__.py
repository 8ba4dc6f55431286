"""``fastsam3d serve``: one process holds the model on one device and serves many sessions.

:func:`create_app` builds the ASGI app around a prepared :class:`fastsam3d.fastpath.Runner`;
``fastsam3d serve`` (:mod:`fastsam3d.commands.serve`) runs it under uvicorn. Needs the
``serve`` extra (FastAPI, uvicorn, zstandard). See docs/serve.md.
"""

from __future__ import annotations

from .app import create_app
from .manager import ApiError, InferenceQueue, ServerConfig, SessionManager

__all__ = ["create_app", "ServerConfig", "SessionManager", "InferenceQueue", "ApiError"]
