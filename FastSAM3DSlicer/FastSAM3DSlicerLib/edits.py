"""What a prompt becomes on its way through :class:`.logic.InteractiveLogic`: a
:class:`Prompt`, a :class:`PendingEdit` while its inference runs, then an :class:`EditRecord`
(written, undoable) or a :class:`FailedEdit`; the per-segment :class:`SegmentSession`; the
engine and session protocols the logic needs; the logic's errors. Qt-free; no MRML calls here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

from . import geometry, segment_writer
from .errors import FastSAM3DSlicerError

__all__ = [
    "BusyError",
    "EditRecord",
    "Engine",
    "FailedEdit",
    "NoTargetError",
    "PendingEdit",
    "Prompt",
    "SegmentSession",
    "SessionLike",
    "StaleResultError",
    "UserEdit",
    "extent_overlap",
    "thicken_box",
    "timed_call",
]


class SessionLike(Protocol):
    """What we need of ``fastsam3d.Session`` (also met by the test stubs)."""

    def set_volume(self, volume: Any) -> None: ...
    def add_point(self, ras: Sequence[float], positive: bool = True) -> Any: ...
    def add_box(self, ras_min: Sequence[float], ras_max: Sequence[float]) -> Any: ...
    def undo(self) -> Any: ...
    def reset(self) -> None: ...


class Engine(Protocol):
    """Creates sessions that share one loaded network; called on the worker thread only."""

    device: str

    def new_session(self) -> SessionLike: ...
    def make_volume(self, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Any: ...


class NoTargetError(FastSAM3DSlicerError, RuntimeError):
    """A prompt arrived before a volume, a segmentation and a segment were chosen."""


class StaleResultError(FastSAM3DSlicerError, RuntimeError):
    """A result arrived for a scene that was closed (or nodes that were replaced) meanwhile:
    it is dropped, nothing is written."""


class BusyError(FastSAM3DSlicerError, RuntimeError):
    """An action that must wait for the predictions in flight (undo, clear)."""


@dataclasses.dataclass
class Prompt:
    kind: str  # "point" or "box"
    world: tuple  # point: (R, A, S); box: ((min), (max)) in world RAS
    volume_ras: tuple  # the same in the volume's own RAS, as given to the session
    positive: bool = True
    tag: Any = None  # the Widget's handle of the marker (to remove it on undo)


@dataclasses.dataclass
class EditRecord:
    prompt: Prompt
    undo: segment_writer.UndoEntry
    region: geometry.Region
    inference_s: float
    total_s: float
    voxels: int  # voxels of the result inside its region
    outside_edits: int = 0  # voxels changed outside FastSAM3D since our last write, kept


@dataclasses.dataclass
class FailedEdit:
    """A prompt whose prediction or write failed (or was dropped: StaleResultError); the
    session did not keep it."""

    prompt: Prompt
    error: BaseException


@dataclasses.dataclass
class UserEdit:
    """Voxels of the segment changed outside FastSAM3D (Paint, Erase, another module), found
    over ``extent`` before one of our writes; later writes keep them."""

    extent: tuple
    added: np.ndarray  # bool [k, j, i] over extent
    erased: np.ndarray


@dataclasses.dataclass
class SegmentSession:
    ready: Future  # the session's construction on the worker (network warm-up, volume upload)
    signature: tuple
    array: np.ndarray
    volume_node: Any  # the nodes themselves: IDs are reused after a scene is cleared (M8)
    segmentation_node: Any
    segment_id: str
    epoch: int  # InteractiveLogic's scene epoch when the session was made
    # (vtkOrientedImageData copy, label value): the segment just before the session's first
    # write (taken then, after every earlier result was written: M3)
    baseline: tuple | None = None
    history: list[EditRecord] = dataclasses.field(default_factory=list)
    # our writes (EditRecord) and outside edits (UserEdit), oldest first: what the segment
    # should hold if nobody else touched it, and which voxels the user owns (M2)
    timeline: list = dataclasses.field(default_factory=list)
    unwritten: int = 0  # prompts queued for this session and not yet written

    @property
    def session(self) -> SessionLike:
        """Only on the worker (or after ``ready``): tasks run in order, so it is built by then."""
        return self.ready.result()


@dataclasses.dataclass
class PendingEdit:
    key: tuple
    prompt: Prompt
    future: Future
    submitted: float
    entry: SegmentSession | None = None  # the session that computes it (not looked up again)


def thicken_box(
    lo: np.ndarray, hi: np.ndarray, ratio: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Give a flat box depth: sides thinner than ``ratio`` x the largest grow to the largest.

    The session clips its result to the box, so a box one slice thick would give a one-slice
    result. :meth:`InteractiveLogic.add_box` uses it only for degenerate boxes (a side under
    1/1000 of the largest): the Widget's drag and Slicer's ROI already give boxes depth.
    """
    lo, hi = np.asarray(lo, float).copy(), np.asarray(hi, float).copy()
    size = hi - lo
    largest = float(size.max())
    if largest <= 0:
        raise geometry.PromptOutsideVolumeError("The box has no size; draw it again.")
    thin = size < ratio * largest
    center = (lo + hi) / 2
    lo[thin] = center[thin] - largest / 2
    hi[thin] = center[thin] + largest / 2
    return lo, hi


def timed_call(entry: SegmentSession, method: str, *args: Any) -> tuple[Any, float]:
    session = entry.session  # raises the construction error, if any, with its own message
    t0 = time.perf_counter()
    out = getattr(session, method)(*args)
    return out, time.perf_counter() - t0


def extent_overlap(a: Sequence[int], b: Sequence[int]) -> tuple | None:
    """Index slices ([k, j, i] arrays) of the overlap of extents ``a`` and ``b`` in each."""
    lo = [max(a[2 * n], b[2 * n]) for n in range(3)]
    hi = [min(a[2 * n + 1], b[2 * n + 1]) for n in range(3)]
    if any(lo[n] > hi[n] for n in range(3)):
        return None

    def sl(e: Sequence[int]) -> tuple:
        return tuple(slice(lo[n] - e[2 * n], hi[n] - e[2 * n] + 1) for n in (2, 1, 0))

    return sl(a), sl(b)
