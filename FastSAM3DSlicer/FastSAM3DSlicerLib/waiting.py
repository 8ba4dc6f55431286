"""Waiting for background work without starving it of Slicer's GIL.

Slicer's main thread holds the GIL whenever it runs C++ (its idle Qt event loop included) and
lets go of it only while a Python callback blocks. A worker thread (inference, model loading, a
download) therefore advances only while the main thread waits *in Python* in a call that
releases the GIL. Checking ``future.done()`` from a timer and returning gives the worker a few
microseconds per tick: a 15 ms GPU click then takes seconds. Every wait here blocks in
``concurrent.futures.wait`` / ``Event.wait`` (they release the GIL) and hands control back to
the caller's ``pump`` (``slicer.app.processEvents`` in the Widget) every ``interval`` seconds,
so the UI keeps repainting while the worker runs at full speed in between.

No Qt here: the pump is passed in, so tests drive exactly the same loop with a stand-in pump.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Any, Callable

#: How long one wait hands the GIL to the worker before the UI is pumped again (seconds).
#: 25 ms keeps the UI at about 40 repaints per second while the worker has the GIL most of
#: the time.
POLL_WAIT_S = 0.025

#: Recommended interval (ms) of the Widget's QTimer while work is pending. The timer's tick
#: itself waits up to POLL_WAIT_S; a short interval keeps the time Slicer's C++ event loop
#: holds the GIL between two ticks small.
POLL_INTERVAL_MS = 10

#: Seconds one tick of the Widget's timer may keep the UI in its pumped wait before the
#: progress text (download, loading, prediction) is refreshed.
PROGRESS_EVERY_S = 0.5
#: A prediction running this long also shows its elapsed time in Slicer's status bar.
LONG_PREDICTION_S = 2.0


def wait_once(waitable: Any, timeout: float) -> bool:
    """Block up to ``timeout`` seconds (releasing the GIL) until ``waitable`` is done.

    ``waitable``: a ``concurrent.futures.Future``, or anything with ``wait(timeout) -> bool``
    (``threading.Event``, ``weights.DownloadTask``). Returns whether it is done.
    """
    timeout = max(0.0, float(timeout))
    if isinstance(waitable, concurrent.futures.Future):
        concurrent.futures.wait([waitable], timeout=timeout)
        return waitable.done()
    return bool(waitable.wait(timeout))


def wait_pumping(
    waitable: Any,
    pump: Callable[[], Any] | None,
    interval: float = POLL_WAIT_S,
    timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Wait until ``waitable`` is done, calling ``pump()`` every ``interval`` seconds.

    For model loading and downloads from the Widget:
    ``wait_pumping(future, slicer.app.processEvents)``. Between pumps the main thread blocks in
    a GIL-releasing wait, so the worker thread runs at full speed; the pump keeps the UI alive
    (repaints, a Cancel button, a progress bar updated from ``stop``). Returns True when done,
    False when ``timeout`` passed or ``stop()`` returned True (checked after every pump).
    """
    deadline = None if timeout is None else time.perf_counter() + float(timeout)
    while True:
        step = interval
        if deadline is not None:
            step = min(step, max(0.0, deadline - time.perf_counter()))
        if wait_once(waitable, step):
            return True
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        if pump is not None:
            pump()
        if stop is not None and stop():
            return False


class ResultQueue:
    """Futures from the worker, written on the main thread strictly in submission order.

    Each item has ``future`` and ``submitted`` attributes; ``apply(item)`` writes a finished
    one (MRML in :class:`~.logic.InteractiveLogic`) and returns what :meth:`poll` reports;
    ``failed(item, error)`` turns an exception of ``apply`` (or of the future) into a report.
    This is the whole of what the Widget's timer drives, free of MRML so that the GIL harness
    can run it anywhere (``Testing/slicer/benchmarks/bench_gil_latency.py``).
    """

    def __init__(
        self, apply: Callable[[Any], Any], failed: Callable[[Any, BaseException], Any]
    ) -> None:
        self.items: collections.deque = collections.deque()
        self._apply = apply
        self._failed = failed
        self._polling = False  # poll() is running (its pump may fire the timer's poll again)
        self.closed = False

    def append(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def __len__(self) -> int:
        return len(self.items)

    @property
    def busy(self) -> bool:
        return bool(self.items)

    def busy_seconds(self) -> float:
        """Seconds since the oldest unwritten item was submitted (0 when idle)."""
        if not self.items:
            return 0.0
        return time.perf_counter() - self.items[0].submitted

    def poll(
        self,
        timeout: float = POLL_WAIT_S,
        pump: Callable[[], Any] | None = None,
        max_s: float | None = None,
    ) -> list[Any]:
        """Write every finished item, oldest first, after waiting up to ``timeout`` for one.

        The wait releases the GIL, so the worker runs while the main thread is here. With
        ``pump`` it keeps going, pumping the UI between waits, until nothing is pending, or
        ``max_s`` passed, or :meth:`close` was called (from inside the pump). A call made from
        inside the pump (the timer firing again) returns ``[]`` at once.
        """
        if self._polling:
            return []
        self._polling = True
        done: list[Any] = []
        deadline = None if max_s is None else time.perf_counter() + float(max_s)
        try:
            while True:
                if self.items and timeout > 0:
                    wait_once(self.items[0].future, timeout)
                done.extend(self._write_finished())
                if (
                    pump is None
                    or not self.items
                    or self.closed
                    or (deadline is not None and time.perf_counter() >= deadline)
                ):
                    return done
                pump()
        finally:
            self._polling = False

    def _write_finished(self) -> list[Any]:
        done: list[Any] = []
        while self.items and self.items[0].future.done():
            item = self.items.popleft()
            try:
                done.append(self._apply(item))
            except Exception as e:  # noqa: BLE001 - reported to the user by the Widget
                done.append(self._failed(item, e))
        return done

    def wait(self) -> list[Any]:
        """Block until every item is written (headless use, tests, the 'free' main thread)."""
        out: list[Any] = []
        while self.items:
            self.items[0].future.exception()
            out.extend(self.poll(timeout=0))
        return out

    def close(self) -> None:
        """Forget every item; a poll running further up the stack returns."""
        self.closed = True
        self.items.clear()
