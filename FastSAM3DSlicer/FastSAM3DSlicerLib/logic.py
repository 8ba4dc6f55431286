"""Interactive segmentation logic: prompts in, segment regions out, one session per segment.

No Qt here. The Widget calls :meth:`InteractiveLogic.add_point` / ``add_box`` on the main
thread, gets a :class:`PendingEdit` whose inference runs on the persistent worker thread, and
calls :meth:`InteractiveLogic.poll` (from a timer, with ``pump=slicer.app.processEvents``) to
write finished results into MRML on the main thread, in the order the prompts were given.
``poll`` waits for the results in a GIL-releasing wait between event pumps (see
:mod:`.waiting`): under Slicer, where the main thread holds the GIL except inside Python
callbacks, that is what lets the worker run at full speed.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np
import slicer

from . import geometry, mrml
from .waiting import POLL_WAIT_S, ResultQueue
from .worker import InferenceWorker


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


class NoTargetError(RuntimeError):
    """A prompt arrived before a volume, a segmentation and a segment were chosen."""


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
    undo: mrml.UndoEntry
    region: geometry.Region
    inference_s: float
    total_s: float
    voxels: int  # voxels of the result inside its region


@dataclasses.dataclass
class FailedEdit:
    """A prompt whose prediction or write failed; the session did not keep it."""

    prompt: Prompt
    error: BaseException


@dataclasses.dataclass
class PendingEdit:
    key: tuple
    prompt: Prompt
    future: Future
    submitted: float


@dataclasses.dataclass
class _SegmentSession:
    ready: Future  # the session's construction on the worker (network warm-up, volume upload)
    signature: tuple
    array: np.ndarray
    baseline: tuple  # (vtkOrientedImageData copy, label value): the segment before the session
    history: list[EditRecord] = dataclasses.field(default_factory=list)

    @property
    def session(self) -> SessionLike:
        """Only on the worker (or after ``ready``): tasks run in order, so it is built by then."""
        return self.ready.result()


def thicken_box(lo: np.ndarray, hi: np.ndarray, ratio: float = 0.25
                ) -> tuple[np.ndarray, np.ndarray]:
    """Give a flat box (an ROI drawn on one slice) depth: thin sides grow to the largest side.

    The session clips its result to the box, so a box one slice thick would give a one-slice
    result; a structure outlined on a slice usually extends about as far through-plane.
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


def _timed(entry: _SegmentSession, method: str, *args: Any) -> tuple[Any, float]:
    session = entry.session  # raises the construction error, if any, with its own message
    t0 = time.perf_counter()
    out = getattr(session, method)(*args)
    return out, time.perf_counter() - t0


class InteractiveLogic:
    """Keeps one session per (volume, segmentation, segment) and applies results with undo."""

    def __init__(
        self, engine: Engine, worker: InferenceWorker | None = None, max_sessions: int = 4
    ) -> None:
        self.engine = engine
        self.worker = worker or InferenceWorker()
        self.max_sessions = max_sessions
        self._sessions: collections.OrderedDict[tuple, _SegmentSession] = (
            collections.OrderedDict()
        )
        self._queue = ResultQueue(self._apply, lambda p, e: FailedEdit(p.prompt, e))
        self._pending: collections.deque[PendingEdit] = self._queue.items
        self.volume_node: slicer.vtkMRMLScalarVolumeNode | None = None
        self.segmentation_node: slicer.vtkMRMLSegmentationNode | None = None
        self.segment_id: str | None = None
        self.segment_editor_node: slicer.vtkMRMLSegmentEditorNode | None = None
        self.last_edit: EditRecord | None = None

    # -- target -----------------------------------------------------------------------------

    def set_target(
        self,
        volume_node: slicer.vtkMRMLScalarVolumeNode | None,
        segmentation_node: slicer.vtkMRMLSegmentationNode | None,
        segment_id: str | None,
        segment_editor_node: slicer.vtkMRMLSegmentEditorNode | None = None,
    ) -> None:
        """Choose what the next prompts segment. Sessions of other segments are kept."""
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id or None
        self.segment_editor_node = segment_editor_node

    def _key(self) -> tuple:
        if self.volume_node is None or self.segmentation_node is None or not self.segment_id:
            raise NoTargetError(
                "Select a volume, a segmentation and a segment before placing prompts."
            )
        return (self.volume_node.GetID(), self.segmentation_node.GetID(), self.segment_id)

    def _writer(self) -> mrml.SegmentWriter:
        return mrml.SegmentWriter(self.segmentation_node, self.volume_node)

    def _segment_session(self) -> tuple[tuple, _SegmentSession]:
        """The current segment's session, created (or rebuilt after the volume changed)."""
        key = self._key()
        self._writer().image_to_segmentation()  # refuse non-linear volume->segmentation now
        signature = mrml.volume_signature(self.volume_node)
        entry = self._sessions.get(key)
        if entry is not None and entry.signature == signature:
            self._sessions.move_to_end(key)
            return key, entry
        if self._pending:
            raise RuntimeError("cannot rebuild a session while predictions are pending")
        array = mrml.volume_array(self.volume_node)
        ijk_to_ras = mrml.volume_ijk_to_ras(self.volume_node)
        baseline = self._writer().snapshot_segment(self.segment_id)

        def build() -> SessionLike:
            session = self.engine.new_session()
            session.set_volume(self.engine.make_volume(array, ijk_to_ras))
            return session

        # Built on the worker, not awaited: the first click's set-up (warm-up, upload) must not
        # freeze Slicer; the click queued behind it runs once it is done.
        entry = _SegmentSession(self.worker.submit(build), signature, array, baseline)
        self._sessions[key] = entry
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return key, entry

    # -- prompts ----------------------------------------------------------------------------

    def add_point(self, world_ras: Sequence[float], positive: bool = True,
                  tag: Any = None) -> PendingEdit:
        """Queue a click given in world RAS; refused (ValueError) when outside the volume."""
        key, entry = self._segment_session()
        vol_ras = mrml.world_to_volume_ras(self.volume_node, world_ras)
        ijk_to_ras = mrml.volume_ijk_to_ras(self.volume_node)
        what = "positive point" if positive else "negative point"
        geometry.check_inside(ijk_to_ras, entry.array.shape, vol_ras, what)
        prompt = Prompt("point", tuple(map(float, world_ras)), tuple(map(float, vol_ras)),
                        positive, tag)
        future = self.worker.submit(_timed, entry, "add_point", tuple(vol_ras), positive)
        return self._enqueue(key, prompt, future)

    def add_box(self, world_corners: np.ndarray, tag: Any = None) -> PendingEdit:
        """Queue a box given by its corners in world RAS (e.g. a rotated ROI's eight corners)."""
        key, entry = self._segment_session()
        corners = np.array([mrml.world_to_volume_ras(self.volume_node, c) for c in world_corners])
        lo, hi = thicken_box(corners.min(axis=0), corners.max(axis=0))
        ijk_to_ras = mrml.volume_ijk_to_ras(self.volume_node)
        if not geometry.box_corners_inside(ijk_to_ras, entry.array.shape, lo, hi):
            raise geometry.PromptOutsideVolumeError(
                "The box does not overlap the volume; draw it on the volume being segmented."
            )
        world = np.asarray(world_corners, float)
        prompt = Prompt("box", (tuple(world.min(axis=0)), tuple(world.max(axis=0))),
                        (tuple(lo), tuple(hi)), True, tag)
        future = self.worker.submit(_timed, entry, "add_box", tuple(lo), tuple(hi))
        return self._enqueue(key, prompt, future)

    def add_roi(self, roi_node: slicer.vtkMRMLMarkupsROINode, tag: Any = None) -> PendingEdit:
        return self.add_box(mrml.roi_corners_world(roi_node), tag)

    def _enqueue(self, key: tuple, prompt: Prompt, future: Future) -> PendingEdit:
        return self._queue.append(PendingEdit(key, prompt, future, time.perf_counter()))

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    # -- results ----------------------------------------------------------------------------

    def busy_seconds(self) -> float:
        """Seconds since the oldest unwritten prompt was given (0 when idle): for the Widget to
        show elapsed time on long predictions (a first click on a CPU, a cold GPU)."""
        return self._queue.busy_seconds()

    def poll(
        self,
        timeout: float = POLL_WAIT_S,
        pump: Callable[[], Any] | None = None,
        max_s: float | None = None,
    ) -> list[EditRecord | FailedEdit]:
        """Write every finished prediction, oldest first; failures are returned, not raised.

        What the Widget's timer calls, as ``poll(pump=slicer.app.processEvents)``: it waits for
        the oldest prediction in a GIL-releasing wait, writes what is finished, pumps the UI,
        and repeats until nothing is pending, so the worker runs at full speed although
        Slicer's event loop holds the GIL (see :class:`.waiting.ResultQueue`). Right after a
        prompt, ``poll()`` without a pump (one wait of ``timeout``) writes a fast result before
        the prompt's callback returns.
        """
        return self._queue.poll(timeout, pump, max_s)

    def wait(self) -> list[EditRecord | FailedEdit]:
        """Block until every queued prediction is written (headless use and tests)."""
        return self._queue.wait()

    def _apply(self, pending: PendingEdit) -> EditRecord:
        entry = self._sessions.get(pending.key)
        if entry is not None and entry.ready.done() and entry.ready.exception() is not None:
            del self._sessions[pending.key]  # a failed set-up is retried at the next prompt
        result, inference_s = pending.future.result()
        if entry is None:
            raise RuntimeError("the session of this prompt was closed before its result arrived")
        volume_id, segmentation_id, segment_id = pending.key
        scene = self.volume_node.GetScene() if self.volume_node is not None else None
        volume = scene.GetNodeByID(volume_id) if scene is not None else None
        segmentation = scene.GetNodeByID(segmentation_id) if scene is not None else None
        if volume is None or segmentation is None:
            raise RuntimeError("the volume or segmentation of this prompt was removed")
        writer = mrml.SegmentWriter(segmentation, volume)
        region = tuple(result.region)
        settings = mrml.MaskingSettings.from_segment_editor_node(self.segment_editor_node)
        extent = geometry.region_to_extent(region, entry.array.shape)
        image_to_seg = writer.image_to_segmentation()
        keep = None
        labelmap, label = entry.baseline
        if labelmap.GetPointData().GetScalars() is not None:
            keep = mrml.read_labelmap(labelmap, label, image_to_seg, extent).astype(bool)
        voxels = entry.array[region] if settings.intensity_mask else None
        mask = np.asarray(result.mask, bool)
        undo = writer.write(segment_id, region, mask, settings, keep=keep, region_voxels=voxels)
        record = EditRecord(
            pending.prompt, undo, region, inference_s,
            time.perf_counter() - pending.submitted, int(mask.sum()),
        )
        entry.history.append(record)
        self.last_edit = record
        return record

    # -- undo / clear -----------------------------------------------------------------------

    def can_undo(self) -> bool:
        key = self._key()
        entry = self._sessions.get(key)
        return bool(entry and entry.history) and not self._pending

    def undo(self) -> Prompt | None:
        """Undo the current segment's last prompt: the session steps back, the labelmap too."""
        if self._pending:
            raise RuntimeError("wait for the running prediction to finish before undoing")
        entry = self._sessions.get(self._key())
        if entry is None or not entry.history:
            return None
        record = entry.history.pop()
        self.worker.call(lambda: entry.session.undo())
        mrml.SegmentWriter(self.segmentation_node, self.volume_node).restore(record.undo)
        return record.prompt

    def clear(self) -> list[Prompt]:
        """Forget the current segment's prompts; the segment keeps what it holds now."""
        if self._pending:
            raise RuntimeError("wait for the running prediction to finish before clearing")
        key = self._key()
        entry = self._sessions.get(key)
        if entry is None:
            return []
        self.worker.call(lambda: entry.session.reset())
        prompts = [r.prompt for r in entry.history]
        entry.history.clear()
        entry.baseline = self._writer().snapshot_segment(self.segment_id)
        return prompts

    def prompts(self) -> list[Prompt]:
        try:
            entry = self._sessions.get(self._key())
        except NoTargetError:
            return []
        return [r.prompt for r in entry.history] if entry else []

    def forget_sessions(self) -> None:
        """Drop every session (e.g. the scene closes); the network stays loaded."""
        if self._pending:
            raise RuntimeError("wait for the running prediction to finish first")
        self._sessions.clear()

    def close(self) -> None:
        """Drop all sessions (their cached embeddings) and stop the worker."""
        self._sessions.clear()
        self._queue.close()
        self.worker.shutdown(wait=False)
