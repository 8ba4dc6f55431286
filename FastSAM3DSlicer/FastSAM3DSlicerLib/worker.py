"""One persistent inference thread for everything that touches the network.

cuDNN keeps its autotuning results and execution plans per thread, and CUDA graphs are
captured on a thread's stream: running each click on a fresh thread pays the set-up cost
every time. All model loading, warm-up and prediction therefore go through one long-lived
thread; MRML and Qt stay on the main thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class InferenceWorker:
    """A single daemon-like worker; tasks run strictly in submission order."""

    def __init__(self, name: str = "FastSAM3D-inference") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_id: int | None = None
        self._lock = threading.Lock()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        with self._lock:
            if self._thread_id is None:
                self._thread_id = threading.get_ident()
        return fn(*args, **kwargs)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        return self._executor.submit(self._run, fn, args, kwargs)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run on the worker and wait: for set-up steps the caller cannot proceed without."""
        return self.submit(fn, *args, **kwargs).result()

    @property
    def thread_id(self) -> int | None:
        """Identity of the worker thread once it has run a task (tests check it never changes)."""
        return self._thread_id

    def shutdown(self, wait: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)
