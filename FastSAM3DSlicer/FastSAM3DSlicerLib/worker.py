"""One persistent inference thread for everything that touches the network.

cuDNN keeps its autotuning results and execution plans per thread, and CUDA graphs are
captured on a thread's stream: running each click on a fresh thread pays the set-up cost
every time. All model loading, warm-up and prediction therefore go through one long-lived
thread; MRML and Qt stay on the main thread.

The thread is a daemon (not a ``ThreadPoolExecutor`` thread, which the interpreter joins at
exit): quitting Slicer never waits for a prediction in flight (review m10).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_STOP = object()


class InferenceWorker:
    """A single daemon worker thread; tasks run strictly in submission order."""

    def __init__(self, name: str = "FastSAM3D-inference") -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread_id: int | None = None
        self._thread.start()

    def _loop(self) -> None:
        self._thread_id = threading.get_ident()
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)
            else:
                future.set_result(result)
            del task, future, fn, args, kwargs  # drop references (results) before waiting again

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the inference worker was shut down")
            future: Future = Future()
            self._tasks.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run on the worker and wait: for set-up steps the caller cannot proceed without."""
        return self.submit(fn, *args, **kwargs).result()

    @property
    def thread_id(self) -> int | None:
        """Identity of the worker thread once it has run a task (tests check it never changes)."""
        return self._thread_id

    @property
    def daemon(self) -> bool:
        return self._thread.daemon

    def shutdown(self, wait: bool = False) -> None:
        """Cancel the queued tasks and stop after the running one (waited for if ``wait``)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                pending = []
                while True:
                    try:
                        pending.append(self._tasks.get_nowait())
                    except queue.Empty:
                        break
                for task in pending:
                    if task is not _STOP:
                        task[0].cancel()
                self._tasks.put(_STOP)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
