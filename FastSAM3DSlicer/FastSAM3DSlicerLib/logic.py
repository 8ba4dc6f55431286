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
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import slicer

from . import geometry, mrml, segment_writer
from .edits import (
    BusyError,
    EditRecord,
    Engine,
    FailedEdit,
    NoTargetError,
    PendingEdit,
    Prompt,
    SegmentSession,
    SessionLike,
    StaleResultError,
    UserEdit,
    extent_overlap,
    thicken_box,
    timed_call,
)
from .waiting import POLL_WAIT_S, ResultQueue
from .worker import InferenceWorker

# Re-exported: callers (the Widget, tests, benchmarks) import the records from here.
__all__ = [
    "BusyError",
    "EditRecord",
    "Engine",
    "FailedEdit",
    "InteractiveLogic",
    "NoTargetError",
    "PendingEdit",
    "Prompt",
    "SessionLike",
    "StaleResultError",
    "thicken_box",
]


#: Sessions kept at most, whatever the memory budget (each holds a device copy of the volume).
MAX_SESSIONS = 32
#: Device memory the kept sessions may use for their volume copies (float32 each).
SESSION_MEMORY_BUDGET = 8 * 2**30


class InteractiveLogic:
    """Keeps one session per (volume, segmentation, segment) and applies results with undo.

    What the user has is never lost: voxels painted before a session, and edits made outside
    FastSAM3D between prompts (Paint, Erase, other modules), are detected before each write and
    kept (:meth:`_apply`); a result for a closed scene is dropped (:meth:`forget_sessions`);
    sessions with undo history are evicted last, and an eviction is reported (:meth:`notices`).
    """

    def __init__(
        self,
        engine: Engine,
        worker: InferenceWorker | None = None,
        max_sessions: int = MAX_SESSIONS,
        memory_budget: int = SESSION_MEMORY_BUDGET,
    ) -> None:
        self.engine = engine
        self.worker = worker or InferenceWorker()
        self.max_sessions = max_sessions
        self.memory_budget = memory_budget
        self._sessions: collections.OrderedDict[tuple, SegmentSession] = collections.OrderedDict()
        # One private volume copy per volume state, shared by its segments' sessions.
        self._arrays: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._queue = ResultQueue(self._apply, self._failed)
        self._pending: collections.deque[PendingEdit] = self._queue.items
        self._epoch = 0
        self._next_engine: Engine | None = None
        self._notices: list[str] = []
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

    def _writer(self) -> segment_writer.SegmentWriter:
        return segment_writer.SegmentWriter(self.segmentation_node, self.volume_node)

    def _current(self, key: tuple) -> SegmentSession | None:
        """The target's session if it is still valid for the target's nodes and this scene."""
        entry = self._sessions.get(key)
        if (
            entry is None
            or entry.epoch != self._epoch
            or entry.volume_node is not self.volume_node
            or entry.segmentation_node is not self.segmentation_node
        ):
            return None
        return entry

    def _segment_session(self) -> tuple[tuple, SegmentSession]:
        """The current segment's session, created (or rebuilt after the volume changed).

        Never refuses because predictions are pending (M3): a rebuilt session's results and
        the old one's each carry their own session, and the baseline of what the segment
        held is taken at the session's first write, after every earlier result is written.
        """
        key = self._key()
        writer = self._writer()
        writer.image_to_segmentation()  # refuse non-linear volume->segmentation now
        writer.check_segment(self.segment_id)  # a deleted segment: KeyError naming it
        signature = mrml.volume_signature(self.volume_node)
        entry = self._current(key)
        if entry is not None and entry.signature == signature:
            self._sessions.move_to_end(key)
            return key, entry
        array = self._arrays.get(signature)
        if array is None:
            array = mrml.volume_array(self.volume_node)
            self._arrays[signature] = array
        ijk_to_ras = mrml.volume_ijk_to_ras(self.volume_node)
        engine = self.engine

        def build() -> SessionLike:
            session = engine.new_session()
            session.set_volume(engine.make_volume(array, ijk_to_ras))
            return session

        # Built on the worker, not awaited: the first click's set-up (warm-up, upload) must not
        # freeze Slicer; the click queued behind it runs once it is done.
        entry = SegmentSession(
            self.worker.submit(build),
            signature,
            array,
            self.volume_node,
            self.segmentation_node,
            self.segment_id,
            self._epoch,
        )
        self._sessions.pop(key, None)
        self._sessions[key] = entry
        self._evict(keep=entry)
        return key, entry

    def _session_limit(self) -> int:
        per = max((e.array.size * 4 for e in self._sessions.values()), default=1)
        return max(2, min(self.max_sessions, self.memory_budget // max(per, 1)))

    def _evict(self, keep: SegmentSession) -> None:
        """Over the limit, drop the least recently used idle session, one without undo history
        first; dropping one with history is reported (m8: never silently)."""
        while len(self._sessions) > self._session_limit():
            idle = [(k, e) for k, e in self._sessions.items() if e is not keep and e.unwritten == 0]
            if not idle:
                return
            key, entry = next(((k, e) for k, e in idle if not e.history), idle[0])
            del self._sessions[key]
            if entry.history:
                self._notices.append(
                    f"Too many segments in use: the FastSAM3D prompts and undo history of "
                    f"segment {entry.segment_id!r} were dropped to free memory (its voxels are "
                    "kept; new prompts start a new session)."
                )

    def notices(self) -> list[str]:
        """Messages for the user since the last call (e.g. a session dropped to free memory)."""
        out, self._notices = self._notices, []
        return out

    # -- prompts ----------------------------------------------------------------------------

    def add_point(
        self, world_ras: Sequence[float], positive: bool = True, tag: Any = None
    ) -> PendingEdit:
        """Queue a click given in world RAS; refused (ValueError) when outside the volume.

        Prompts queue behind the ones in flight: they never fail because one is pending.
        """
        key, entry = self._segment_session()
        vol_ras = mrml.world_to_volume_ras(self.volume_node, world_ras)
        ijk_to_ras = mrml.volume_ijk_to_ras(self.volume_node)
        what = "positive point" if positive else "negative point"
        geometry.check_inside(ijk_to_ras, entry.array.shape, vol_ras, what)
        prompt = Prompt(
            "point", tuple(map(float, world_ras)), tuple(map(float, vol_ras)), positive, tag
        )
        future = self.worker.submit(timed_call, entry, "add_point", tuple(vol_ras), positive)
        return self._enqueue(key, entry, prompt, future)

    def add_box(self, world_corners: np.ndarray, tag: Any = None) -> PendingEdit:
        """Queue a box given by its corners in world RAS (e.g. a rotated ROI's eight corners).

        The box is used as given (the Widget decides the depth of a box drawn on a slice);
        only a degenerate, flat box is given depth by :func:`thicken_box`.
        """
        key, entry = self._segment_session()
        corners = np.array([mrml.world_to_volume_ras(self.volume_node, c) for c in world_corners])
        lo, hi = thicken_box(corners.min(axis=0), corners.max(axis=0), ratio=1e-3)
        ijk_to_ras = mrml.volume_ijk_to_ras(self.volume_node)
        if not geometry.box_corners_inside(ijk_to_ras, entry.array.shape, lo, hi):
            raise geometry.PromptOutsideVolumeError(
                "The box does not overlap the volume; draw it on the volume being segmented."
            )
        world = np.asarray(world_corners, float)
        prompt = Prompt(
            "box",
            (tuple(world.min(axis=0)), tuple(world.max(axis=0))),
            (tuple(lo), tuple(hi)),
            True,
            tag,
        )
        future = self.worker.submit(timed_call, entry, "add_box", tuple(lo), tuple(hi))
        return self._enqueue(key, entry, prompt, future)

    def add_roi(self, roi_node: slicer.vtkMRMLMarkupsROINode, tag: Any = None) -> PendingEdit:
        return self.add_box(mrml.roi_corners_world(roi_node), tag)

    def _enqueue(
        self, key: tuple, entry: SegmentSession, prompt: Prompt, future: Future
    ) -> PendingEdit:
        entry.unwritten += 1
        return self._queue.append(PendingEdit(key, prompt, future, time.perf_counter(), entry))

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def pending_count(self) -> int:
        """Prompts given and not yet written (the one running included)."""
        return len(self._pending)

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
        the prompt's callback returns. An engine change asked for while busy
        (:meth:`set_engine`) takes effect here once nothing is pending.
        """
        out = self._queue.poll(timeout, pump, max_s)
        self._switch_engine_when_idle()
        return out

    def wait(self) -> list[EditRecord | FailedEdit]:
        """Block until every queued prediction is written (headless use and tests)."""
        out = self._queue.wait()
        self._switch_engine_when_idle()
        return out

    @staticmethod
    def _failed(pending: PendingEdit, error: BaseException) -> FailedEdit:
        return FailedEdit(pending.prompt, error)

    def _check_alive(self, entry: SegmentSession) -> None:
        """Refuse to write into a closed scene or into nodes that replaced ours (M8)."""
        if entry.epoch != self._epoch:
            raise StaleResultError(
                "The scene was closed before this prompt's result arrived; nothing was written."
            )
        for node in (entry.volume_node, entry.segmentation_node):
            scene = node.GetScene()
            if scene is None or scene.GetNodeByID(node.GetID()) is not node:
                raise StaleResultError(
                    f"{node.GetName()!r} was removed before this prompt's result arrived; "
                    "nothing was written."
                )

    def _apply(self, pending: PendingEdit) -> EditRecord:
        entry = pending.entry
        entry.unwritten -= 1
        if entry.ready.done() and entry.ready.exception() is not None:
            if self._sessions.get(pending.key) is entry:
                del self._sessions[pending.key]  # a failed set-up is retried at the next prompt
        result, inference_s = pending.future.result()
        self._check_alive(entry)
        writer = segment_writer.SegmentWriter(entry.segmentation_node, entry.volume_node)
        region = tuple(result.region)
        settings = segment_writer.MaskingSettings.from_segment_editor_node(self.segment_editor_node)
        extent = geometry.region_to_extent(region, entry.array.shape)
        image_to_seg = writer.image_to_segmentation()
        if entry.baseline is None:
            entry.baseline = writer.snapshot_segment(entry.segment_id)
        mask = np.asarray(result.mask, bool)
        keep, off, outside = self._user_voxels(entry, writer, image_to_seg, extent)
        voxels = entry.array[region] if settings.intensity_mask else None
        undo = writer.write(
            entry.segment_id, region, mask & ~off, settings, keep=keep, region_voxels=voxels
        )
        record = EditRecord(
            pending.prompt,
            undo,
            region,
            inference_s,
            time.perf_counter() - pending.submitted,
            int(mask.sum()),
            outside,
        )
        entry.history.append(record)
        # The session keeps a bounded undo history (fastsam3d.Session(max_undo=...)): keep ours
        # the same length, or an undo past the session's oldest step would fail half-way.
        # A session without the attribute (a server's) has fastsam3d's default, 100.
        limit = getattr(entry.session, "max_undo", 100)
        if isinstance(limit, int) and limit >= 0 and len(entry.history) > limit:
            del entry.history[: len(entry.history) - limit]
        entry.timeline.append(record)
        self.last_edit = record
        return record

    def _user_voxels(
        self,
        entry: SegmentSession,
        writer: segment_writer.SegmentWriter,
        image_to_seg: np.ndarray,
        extent: Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(keep, off, n): over ``extent``, the voxels the user owns (held before the session,
        or added outside FastSAM3D) and those the user erased outside FastSAM3D, and how many
        voxels were newly found edited outside (M2).

        What the segment should hold had nobody else touched it is replayed from the baseline
        and the timeline; where it holds something else, an outside edit happened since our
        last write: it is recorded, and every later write keeps it.
        """
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        if geometry.extent_is_empty(extent):
            return np.zeros(shape, bool), np.zeros(shape, bool), 0
        labelmap, label = entry.baseline
        base = segment_writer.read_labelmap(labelmap, label, image_to_seg, extent).astype(bool)
        expected, keep, off = base.copy(), base.copy(), np.zeros(shape, bool)
        for item in entry.timeline:
            where = extent_overlap(
                item.extent if isinstance(item, UserEdit) else item.undo.extent, extent
            )
            if where is None:
                continue
            theirs, ours = where
            if isinstance(item, EditRecord):
                after = item.undo.after
                if after is not None:
                    expected[ours] = after[theirs]
                continue
            for a in (expected, keep):
                a[ours] |= item.added[theirs]
                a[ours] &= ~item.erased[theirs]
            off[ours] |= item.erased[theirs]
            off[ours] &= ~item.added[theirs]
        current = writer.read_segment(entry.segment_id, image_to_seg, extent).astype(bool)
        added, erased = current & ~expected, expected & ~current
        n = int(added.sum() + erased.sum())
        if n:
            entry.timeline.append(UserEdit(tuple(extent), added, erased))
            keep |= added
            keep &= ~erased
            off |= erased
            off &= ~added
        return keep, off, n

    # -- undo / clear -----------------------------------------------------------------------

    def can_undo(self) -> bool:
        entry = self._current(self._key())
        return bool(entry and entry.history) and not self._pending

    def undo(self) -> Prompt | None:
        """Undo the current segment's last prompt: the session steps back, the labelmap too.

        Voxels edited outside FastSAM3D after that prompt's write stay as the user left them.
        """
        if self._pending:
            raise BusyError("wait for the running prediction to finish before undoing")
        entry = self._current(self._key())
        if entry is None or not entry.history:
            return None
        record = entry.history.pop()
        entry.timeline = [t for t in entry.timeline if t is not record]
        self.worker.call(lambda: entry.session.undo())
        undo = record.undo
        writer = segment_writer.SegmentWriter(entry.segmentation_node, entry.volume_node)
        after = undo.after
        if not undo.empty and after is not None and entry.segment_id in undo.previous:
            now = writer.read_segment(
                entry.segment_id, undo.image_to_segmentation, undo.extent
            ).astype(bool)
            changed_since = now != after
            previous = dict(undo.previous)
            previous[entry.segment_id] = np.where(
                changed_since, now, previous[entry.segment_id].astype(bool)
            ).astype(np.uint8)
            undo = dataclasses.replace(undo, previous=previous)
        writer.restore(undo)
        return record.prompt

    def clear(self) -> list[Prompt]:
        """Forget the current segment's prompts; the segment keeps what it holds now."""
        if self._pending:
            raise BusyError("wait for the running prediction to finish before clearing")
        entry = self._current(self._key())
        if entry is None:
            return []
        self.worker.call(lambda: entry.session.reset())
        prompts = [r.prompt for r in entry.history]
        entry.history.clear()
        entry.timeline.clear()
        entry.baseline = None  # taken again at the next write: everything now is the user's
        return prompts

    def prompts(self) -> list[Prompt]:
        try:
            entry = self._current(self._key())
        except NoTargetError:
            return []
        return [r.prompt for r in entry.history] if entry else []

    # -- scene and engine lifecycle ---------------------------------------------------------

    def forget_sessions(self) -> None:
        """Drop every session (the scene closes); the network stays loaded.

        Allowed while predictions are in flight: their results belong to the old scene and
        are dropped when they arrive (a FailedEdit with StaleResultError), never written into
        nodes of a new scene that reuse the old IDs (M8).
        """
        self._epoch += 1
        self._sessions.clear()
        self._arrays.clear()

    def set_engine(self, engine: Engine) -> bool:
        """Use another network (weights or device). Sessions of the old one are dropped.

        While predictions are in flight the change waits until they are written (m1) and this
        returns False; :attr:`engine_change_pending` tells, and :meth:`poll` applies it.
        """
        self._next_engine = engine
        self._switch_engine_when_idle()
        return self._next_engine is None

    @property
    def engine_change_pending(self) -> bool:
        return self._next_engine is not None

    def _switch_engine_when_idle(self) -> None:
        if self._next_engine is None or self._pending:
            return
        if any(e.history for e in self._sessions.values()):
            self._notices.append(
                "The model changed: FastSAM3D prompts and undo history start afresh "
                "(segments keep their voxels)."
            )
        self.engine, self._next_engine = self._next_engine, None
        self.forget_sessions()

    def close(self) -> None:
        """Drop all sessions (their cached embeddings) and stop the worker."""
        self._sessions.clear()
        self._queue.close()
        self.worker.shutdown(wait=False)
