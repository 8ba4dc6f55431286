"""A model of Slicer's main loop for the GIL: C++ that keeps the GIL, then the module's timer.

Slicer's main thread holds the GIL whenever it runs C++ (PythonQt never releases it; its idle Qt
event loop included) and runs Python only in callbacks. ``hold_gil`` is such C++: ``usleep``
called through ``ctypes.PyDLL``, which (unlike ``ctypes.CDLL``) keeps the GIL during the call.
No slicer import here: the device benchmark runs this without slicer-core.

``click_to_written`` measures one prompt from submission to its result being written, with the
main thread either *free* (blocked in a GIL-releasing wait, the best case) or *Slicer-like*
(what the Widget does under Slicer: ``poll()`` right after the prompt, in the prompt's
callback, then timer ticks of ``poll(pump=...)`` separated by ``gap_s`` of GIL-holding C++;
the pump, ``slicer.app.processEvents`` in Slicer, is modelled as ``pump_s`` of GIL-holding C++),
or *legacy* (the Widget before this change: ``poll`` that never waits, a 30 ms timer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Any

_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.usleep.argtypes = [ctypes.c_uint]

GAP_S = 0.030  # C++ between two timer ticks (Slicer's event loop, rendering): GIL held
PUMP_S = 0.002  # one processEvents() inside the pumping poll: GIL held


def hold_gil(seconds: float) -> None:
    """Sleep in C without releasing the GIL, as Slicer's event loop does."""
    _libc.usleep(int(seconds * 1e6))


def click_to_written(
    submit: Callable[[], Any],
    poller: Any,
    mode: str,
    gap_s: float = GAP_S,
    pump_s: float = PUMP_S,
    limit_s: float = 60.0,
) -> tuple[list, int]:
    """Submit one prompt and run the main loop of ``mode`` until it is written.

    ``poller`` has ``poll(timeout=..., pump=...)``, ``wait()`` and ``busy`` (the Lib's
    ``InteractiveLogic`` or its ``ResultQueue``). Returns (what poll reported, timer ticks).
    The latency itself is measured by the poller's records (submission to written).
    """
    submit()
    out: list = []
    ticks = 0
    if mode == "free":
        return poller.wait(), 0
    t0 = time.perf_counter()
    if mode == "slicer":
        out.extend(poller.poll())  # in the prompt's callback: one wait, no pump
    while poller.busy and time.perf_counter() - t0 < limit_s:
        hold_gil(gap_s)
        ticks += 1
        if mode == "slicer":
            out.extend(poller.poll(pump=lambda: hold_gil(pump_s)))
        elif mode == "legacy":
            out.extend(poller.poll(timeout=0))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return out, ticks


def future_done(
    future: Any,
    mode: str,
    gap_s: float = GAP_S,
    pump_s: float = PUMP_S,
    tick_s: float = 0.5,
    limit_s: float = 600.0,
) -> tuple[float, int]:
    """Wait for a worker ``future`` (model loading, a download) with the main loop of ``mode``.

    ``free``: a blocking wait. ``tick``: each timer tick is one ``waiting.wait_once`` of
    POLL_WAIT_S after ``gap_s`` of GIL-holding C++. ``pumped``: each tick is
    ``waiting.wait_pumping(..., timeout=tick_s)`` pumping every POLL_WAIT_S. ``legacy``: each
    tick only checks ``done()``. Returns (seconds until done was seen, ticks).
    """
    from FastSAM3DSlicerLib.waiting import POLL_WAIT_S, wait_once, wait_pumping

    t0 = time.perf_counter()
    ticks = 0
    if mode == "free":
        future.exception()
        return time.perf_counter() - t0, 0
    while time.perf_counter() - t0 < limit_s:
        hold_gil(gap_s)
        ticks += 1
        if mode == "tick":
            done = wait_once(future, POLL_WAIT_S)
        elif mode == "pumped":
            done = wait_pumping(future, lambda: hold_gil(pump_s), timeout=tick_s)
        elif mode == "legacy":
            done = future.done()
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if done:
            break
    return time.perf_counter() - t0, ticks
