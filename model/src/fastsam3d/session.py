"""The interactive session: world-space clicks and boxes -> a mask on the original grid.

One session segments one object in one volume. The network only ever sees 128^3 crops of the
reference recipe's 1.5 mm canonical lattice (:mod:`fastsam3d.geometry`); the session decides
which crops, caches each crop's image embedding, feeds the previous low-res logits back as the
mask prompt, and maps the logits back onto the original voxels inside the crops' footprints.

Point policy (how clicks reach the decoder) follows how each model's decoder was trained,
``model.config.point_policy``; override with ``Session(..., point_policy=...)``:

* ``"newest"`` (FastSAM3D): only the newest click, plus the previous low-res logits. FastSAM3D's
  decoder fine-tuning (``train.py``, multi-click off) and its evaluation loop both do this; the
  click history lives in the logits.
* ``"accumulate"`` (SAM-Med3D-turbo and anything unknown): every click inside the crop so far,
  plus the previous logits, as SAM-Med3D's current inference does.

Objects larger than one crop: when the mask reaches a crop face that has volume behind it, a
neighbouring crop half a crop further (64 lattice voxels, 50 % overlap, same lattice) is added,
seeded with a positive point where the mask crosses the face and the overlapping half of the
logits as its mask prompt, until the mask stops touching faces or ``max_crops`` is reached.
Overlapping crops are blended with weights that fade towards each crop's faces, so the merged
mask has no seam. A click outside every crop adds a crop centred on it. A later click is decoded
in every crop that contains it (each with its own previous logits); crops that do not contain it
keep their masks, so a leak that spread into a neighbouring crop is corrected by clicking there.

Boxes: the released weights have no box embedding, so a box places (and for a large box tiles)
the crops, seeds each with a positive point at the centre of its part of the box, and the result
is clipped to the box. ``add_box`` starts a new object (undo brings the previous one back).

Threads: every public method holds the session's lock, so calls from several threads run one
after another (a click never interleaves with an undo or a ``set_volume``). Memory: the undo
history keeps at most ``max_undo`` steps (each holds its crops' low-res logits, 128 KiB per
crop) and at most ``max_embeddings`` crop embeddings are cached (768 KiB each). Data: the session
works on its own copy of the volume made by ``set_volume``; each click and box compares a
fingerprint of ``volume.array`` (all of it up to 1 MiB, a fixed sample of about 260 000 voxels
beyond) and, when the caller changed it in place, re-reads it and drops the cached embeddings
with a RuntimeWarning. Call ``set_volume`` after editing the array to be certain.

Layout: this module holds the public API, the undo history and the network calls; crop planning
(box tiling, propagation, mask prompts) is :mod:`fastsam3d.tiling` and paste-back onto the
original grid is :mod:`fastsam3d.paste`.

Array libraries: with a PyTorch runner (:class:`fastsam3d.fastpath.Runner`) every array lives on
its device as a torch tensor (:class:`fastsam3d.geometry.TorchOps`); with a torch-free runner
(``runner.array_backend == "numpy"``: :func:`fastsam3d.onnx.torch_free_runner`, ONNX Runtime)
they are numpy arrays (:class:`fastsam3d.resample_numpy.NumpyOps`) and PyTorch is never
imported. The maths is the same; the masks agree (tested).
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import lattice as geo
from . import paste as _paste
from . import tiling
from .result import Region, Result, SessionError, paste_result
from .runners import runner_and_ops
from .tiling import Click as _Click
from .tiling import State as _State
from .tiling import Tile as _Tile
from .volume import Volume, VolumeError, fingerprint

if TYPE_CHECKING:
    import torch

__all__ = ["Session", "Result", "SessionError", "paste_result"]

_CPU_WARNED = False
_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` holding the session's lock (calls from other threads wait)."""

    @functools.wraps(method)
    def wrapper(self: Session, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Session:
    """Interactive segmentation of one object in one volume (see the module docstring).

    Every network call goes through one :class:`fastsam3d.fastpath.Runner`; every public method
    may be called from any thread (calls are serialised by a lock).

    Args:
        model: A registry name, a checkpoint path, a model with the SAM-style parts, or a
            prepared ``Runner`` (shared between sessions: one network copy, one set of graphs),
            or a torch-free runner (:func:`fastsam3d.onnx.torch_free_runner`). Without PyTorch
            installed, a checkpoint path runs on ONNX Runtime (``fastsam3d[onnx]``).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda[:N]"``, ``"mps"`` or a
            ``torch.device``; ignored when ``model`` is a Runner.
        point_policy: How clicks reach the decoder: ``"newest"`` (only the latest click, as
            FastSAM3D was trained) or ``"accumulate"`` (all clicks, SAM-Med3D); None = the
            model's own policy.
        max_crops: Most 128^3 crops (192 mm at 1.5 mm) one object may use; each new crop costs
            one encoder run.
        propagate: Follow an object that reaches a crop face into the neighbouring crop.
        paste_interpolation: ``"nearest"`` maps the crop mask back exactly as the reference
            recipe does; ``"linear"`` samples the logits trilinearly (smoother edges on grids
            finer than 1.5 mm).
        lattice_anchor: ``"centre"`` (current torchio) or ``"corner"`` (torchio before 2025, as
            at training time); see :meth:`fastsam3d.geometry.Lattice.for_volume`.
        warmup: Run the network once now so the first real click is not slow.
        precision: ``"auto"`` is the fast path (bf16 encoder + CUDA graphs on CUDA; bf16 or int8
            encoder on CPUs where that is faster), ``"fp32"`` the exact path, ``"bf16"``/``"int8"``
            forced.
        max_undo: Most undo steps kept (older ones are dropped; 0 disables undo).
        max_embeddings: Most crop embeddings kept for reuse (least recently used dropped first;
            default ``max(32, 2 * max_crops)``).

    Raises:
        CheckpointError: ``model`` names a file that is not a usable checkpoint.
        ValueError: An option is out of range.
    """

    def __init__(
        self,
        model: Any = "fastsam3d",
        device: str | torch.device = "auto",
        *,
        point_policy: str | None = None,
        max_crops: int = 8,
        propagate: bool = True,
        paste_interpolation: str = "nearest",
        lattice_anchor: str = "centre",
        warmup: bool = True,
        precision: str = "auto",
        max_undo: int = 100,
        max_embeddings: int | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.runner, self._ops = runner_and_ops(model, device, precision)
        self.device = self.runner.device
        if getattr(self.device, "type", self.device) == "cpu":
            global _CPU_WARNED
            if not _CPU_WARNED:
                _CPU_WARNED = True
                warnings.warn(
                    "fastsam3d: running on the CPU; each new 128^3 crop costs one "
                    "encoder run (a fraction of a second to seconds). Use a CUDA or "
                    "MPS device for interactive speed.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.model = self.runner.model
        cfg = getattr(self.model, "config", None)
        policy = (
            point_policy
            or getattr(cfg, "point_policy", None)
            or getattr(self.runner, "point_policy", None)
            or "accumulate"
        )
        if policy not in ("newest", "accumulate"):
            raise ValueError(f"point_policy must be 'newest' or 'accumulate', not {policy!r}")
        self.point_policy = policy
        if max_crops < 1:
            raise ValueError("max_crops must be at least 1")
        self.max_crops = int(max_crops)
        if max_undo < 0:
            raise ValueError("max_undo must be 0 or more")
        self.max_undo = int(max_undo)
        cap = max(32, 2 * self.max_crops) if max_embeddings is None else int(max_embeddings)
        if cap < 1:
            raise ValueError("max_embeddings must be at least 1")
        self.max_embeddings = cap
        self.propagate = propagate
        if paste_interpolation not in ("nearest", "linear"):
            raise ValueError(
                f"paste_interpolation must be 'nearest' or 'linear', not {paste_interpolation!r}"
            )
        self.paste_interpolation = paste_interpolation
        if lattice_anchor not in ("centre", "corner"):
            raise ValueError(f"lattice_anchor must be 'centre' or 'corner', not {lattice_anchor!r}")
        self.lattice_anchor = lattice_anchor
        self._weights = self._ops.tile_weights()
        self.volume: Volume | None = None
        self._clear_volume()
        if warmup:
            self._warmup()

    # --- public API -----------------------------------------------------------------------
    @_locked
    def set_volume(self, volume: Volume) -> None:
        """Use ``volume`` and start a new object.

        Args:
            volume: The image: ``volume.array`` is [k, j, i] (slice, row, column), any numeric
                dtype, and ``volume.ijk_to_ras`` its 4x4 voxel-to-RAS-mm matrix (any orientation,
                oblique, anisotropic). The session keeps its own copy (on the model's device)
                and re-reads it when it sees the caller's array edited in place.

        Raises:
            TypeError: ``volume`` is not a :class:`fastsam3d.Volume`.
            VolumeError: The image has NaN/Inf voxels or a geometry the model cannot sample.
        """
        if not isinstance(volume, Volume):
            raise TypeError(f"set_volume needs a fastsam3d.Volume, not {type(volume).__name__}")
        lattice = geo.Lattice.for_volume(
            volume.ijk_to_ras, volume.shape, anchor=self.lattice_anchor
        )
        t, fp = self._upload(volume.array)
        self._clear_volume()
        self.volume = volume
        self._lattice = lattice
        self._tensor = t
        self._source = (volume.array, fp)

    @_locked
    def add_point(self, ras: Sequence[float], positive: bool = True) -> Result:
        """Add a click and return the object's new mask.

        Args:
            ras: Click position, world RAS in mm (x = right, y = anterior, z = superior), as
                Slicer shows it; convert LPS (ITK, DICOM) first.
            positive: True adds the structure under the click, False removes it.

        Returns:
            The :class:`Result`: ``region`` (slices into the [k, j, i] volume), ``mask`` (bool,
            the region's shape), ``crops``, ``iou``. Paste it with :func:`paste_result`.

        Raises:
            SessionError: No volume set, the click is outside the volume, or malformed input.
        """
        vol = self._require_volume()
        p = self._as_point(ras, "click")
        if not isinstance(positive, (bool, np.bool_)) and positive not in (0, 1):
            raise SessionError(f"positive must be True or False, not {positive!r}")
        self._sync_volume()
        if not vol.contains(p):
            ijk = vol.ras_to_ijk(p)
            raise SessionError(
                f"click at RAS {tuple(round(float(x), 2) for x in p)} lies "
                f"outside the volume (voxel index i,j,k = "
                f"{tuple(round(float(x), 1) for x in ijk)}, size {vol.shape[::-1]})"
            )
        state = self._state
        if state.box is not None and not (np.all(p >= state.box[0]) and np.all(p <= state.box[1])):
            raise SessionError("click lies outside the current box; reset() or add a new box")
        click = _Click(self._lattice.ras_to_lattice(p), tuple(float(x) for x in p), bool(positive))
        new = self._apply_click(state, click)
        return self._commit(new)

    @_locked
    def add_box(self, ras_min: Sequence[float], ras_max: Sequence[float]) -> Result:
        """Segment the object inside a box; starts a new object.

        The released weights have no box embedding: the box places a positive click at its
        centre, chooses the crops that cover it and clips the mask to it.

        Args:
            ras_min: Box corner with the smallest R, A, S (mm).
            ras_max: Opposite corner; larger on every axis.

        Returns:
            The :class:`Result` (see :meth:`add_point`).

        Raises:
            SessionError: No volume set, an empty/inverted box, or one missing the volume.
        """
        vol = self._require_volume()
        lo = self._as_point(ras_min, "ras_min")
        hi = self._as_point(ras_max, "ras_max")
        if np.any(hi <= lo):
            raise SessionError(
                f"box is empty or inverted: ras_min {lo.tolist()} must be "
                f"below ras_max {hi.tolist()} on every axis"
            )
        ijk = vol.ras_to_ijk(geo.box_corners(lo, hi))
        size = np.array(vol.shape[::-1])
        if np.any(ijk.max(axis=0) < -0.5) or np.any(ijk.min(axis=0) >= size - 0.5):
            raise SessionError("box does not overlap the volume")
        starts_per_axis, llo, lhi = tiling.box_crop_starts(self._lattice, lo, hi)
        count = math.prod(len(s) for s in starts_per_axis)
        if count > self.max_crops:
            raise SessionError(
                f"box needs {count} crops of {geo.CROP * geo.SPACING:g} mm, "
                f"more than max_crops={self.max_crops}; draw a smaller box or "
                "raise max_crops"
            )
        self._sync_volume()
        tiles: dict[tuple[int, int, int], _Tile] = {}
        zero = self._ops.zeros_lowres()
        for s0 in starts_per_axis[0]:
            for s1 in starts_per_axis[1]:
                for s2 in starts_per_axis[2]:
                    start = (s0, s1, s2)
                    st = np.array(start, dtype=np.float64)
                    c = (np.maximum(llo, st) + np.minimum(lhi, st + geo.CROP - 1)) / 2
                    seed = _Click(c, tuple(self._lattice.lattice_to_ras(c).tolist()), True)
                    logits, iou = self._decode(start, [seed], zero)
                    tiles[start] = _Tile(start, logits, (seed,), iou)
        return self._commit(_State(tiles=tiles, clicks=(), box=(lo, hi)))

    @_locked
    def undo(self) -> Result:
        """Go back one step (a click or a box); repeatable up to ``max_undo`` times.

        Returns:
            The :class:`Result` as it was before that step; its region also covers what the
            undone step changed, so pasting it restores the labelmap.

        Raises:
            SessionError: Nothing to undo (or no volume set).
        """
        self._require_volume()
        if not self._history:
            raise SessionError("nothing to undo")
        self._state = self._history.pop()
        self._result = self._render(self._state)
        return self._result

    @_locked
    def reset(self) -> Result:
        """Forget the object, undo history included.

        Returns:
            An empty :class:`Result` whose region covers what the object held: pasting it
            clears the object from a labelmap.
        """
        self._require_volume()
        self._history.clear()
        self._state = _State()
        self._result = self._render(self._state)
        self._last_region = None  # the caller clears with this result; later ones start afresh
        return self._result

    @property
    def result(self) -> Result | None:
        with self._lock:
            return self._result

    @property
    def can_undo(self) -> bool:
        with self._lock:
            return bool(self._history)

    @property
    def crops(self) -> list[tuple[int, int, int]]:
        """Lattice starts of the crops the current object uses."""
        with self._lock:
            return list(self._state.tiles)

    @property
    def lattice(self) -> geo.Lattice:
        with self._lock:
            self._require_volume()
            return self._lattice

    # --- internals ------------------------------------------------------------------------
    def _clear_volume(self) -> None:
        self.volume = None
        self._tensor: Any = None  # (1, 1, k, j, i) float32, a tensor or a numpy array (ops)
        self._lattice: geo.Lattice = None  # type: ignore[assignment]
        self._embeddings: OrderedDict[tuple[int, int, int], Any] = OrderedDict()
        self._source: tuple[np.ndarray, tuple] | None = None
        self._state = _State()
        self._history: list[_State] = []
        self._result: Result | None = None
        self._last_region: Region | None = None

    def _require_volume(self) -> Volume:
        if self.volume is None:
            raise SessionError("no volume: call set_volume(volume) first")
        return self.volume

    def _upload(self, array: np.ndarray) -> tuple[Any, tuple]:
        """(the session's own float32 copy of ``array`` shaped (1, 1, k, j, i), where the runner
        works, and its fingerprint); VolumeError for a constant volume or values that are not
        finite in float32."""
        fp = fingerprint(array)
        t, n, lo, hi = self._ops.upload(array)
        if n:
            raise VolumeError(
                f"volume has {n} voxel(s) that are NaN or Inf as float32 (values "
                "beyond about 3.4e38 overflow); fix or clip them first"
            )
        if lo == hi:
            raise VolumeError(f"volume is constant (every voxel is {lo}): nothing to segment")
        return t, fp

    def _sync_volume(self) -> None:
        """Re-read the volume if the caller changed its array since ``set_volume`` (no stale
        embeddings): same shape only, else SessionError."""
        vol = self.volume
        assert vol is not None and self._source is not None
        array, fp = self._source
        current = vol.array
        if fingerprint(current) == fp:
            self._source = (current, fp)
            return
        if tuple(current.shape) != tuple(self._tensor.shape[2:]):
            raise SessionError(
                f"the volume's array changed shape from {array.shape} to "
                f"{current.shape} since set_volume; call set_volume(volume)"
            )
        t, new_fp = self._upload(current)
        warnings.warn(
            "fastsam3d: the volume's voxels changed since set_volume; re-reading them "
            "and recomputing the crop embeddings (call set_volume after editing)",
            RuntimeWarning,
            stacklevel=3,
        )
        self._tensor = t
        self._embeddings.clear()
        self._source = (current, new_fp)

    @staticmethod
    def _as_point(p: Sequence[float], what: str) -> np.ndarray:
        try:
            if isinstance(p, (str, bytes)):
                raise TypeError
            a = np.asarray(p, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise SessionError(f"{what} must be three finite RAS coordinates, got {p!r}") from None
        if a.shape != (3,) or not np.all(np.isfinite(a)):
            raise SessionError(f"{what} must be three finite RAS coordinates, got {p!r}")
        return a

    def _commit(self, new: _State) -> Result:
        result = self._render(new)
        if self.max_undo:
            self._history.append(self._state)
            del self._history[: -self.max_undo]
        self._state = new
        self._result = result
        return result

    def _warmup(self) -> None:
        self.runner.warmup()

    def _embedding(self, start: tuple[int, int, int]) -> Any:
        emb = self._embeddings.get(start)
        if emb is None:
            ops = self._ops
            crop = ops.sample_crop(self._tensor, self._lattice, self.volume.ijk_to_ras, start)
            emb = self.runner.encode(ops.network_input(crop))
            self._embeddings[start] = emb
            while len(self._embeddings) > self.max_embeddings:
                self._embeddings.popitem(last=False)
        else:
            self._embeddings.move_to_end(start)
        return emb

    def _run_decoder(self, emb: Any, pts: Any, labels: Any, mask: Any) -> tuple[Any, Any]:
        return self.runner.click(emb, pts, labels, mask)

    def _decode(
        self, start: tuple[int, int, int], points: Sequence[_Click], mask: Any
    ) -> tuple[Any, float | None]:
        with self._ops.inference():
            return self._decode_now(start, points, mask)

    def _decode_now(
        self, start: tuple[int, int, int], points: Sequence[_Click], mask: Any
    ) -> tuple[Any, float | None]:
        ops = self._ops
        emb = self._embedding(start)
        coords = np.stack([c.index - np.asarray(start) for c in points])
        pts = ops.points(coords)
        labels = ops.labels([1 if c.positive else 0 for c in points])
        low_res, iou = self._run_decoder(emb, pts, labels, mask)
        low_res = ops.first_channel(low_res)
        if not ops.all_finite(low_res):
            raise SessionError(
                f"the network returned NaN/Inf logits for the crop at lattice {tuple(start)}: "
                "the weights hold non-finite values or the image's intensities overflow the "
                "normalisation; nothing was changed"
            )
        iou_v = float(iou.reshape(-1)[0]) if iou is not None else None
        return low_res, iou_v

    def _apply_click(self, state: _State, click: _Click) -> _State:
        tiles = dict(state.tiles)
        touched = [s for s in tiles if tiling.inside_tile(s, click.index)]
        well_inside = any(tiling.inside_tile(s, click.index, margin=8) for s in touched)
        new_starts: list[tuple[int, int, int]] = []
        if not well_inside and click.positive:
            start = self._lattice.crop_start(np.asarray(click.ras))
            if start not in tiles:
                new_starts.append(start)
        if len(tiles) + len(new_starts) > self.max_crops:
            raise SessionError(
                f"the object already uses max_crops={self.max_crops} crops; "
                "a click here would need another (raise max_crops)"
            )
        for s in touched:
            t = tiles[s]
            points = tiling.points_for(state, t, s, click, self.point_policy)
            logits, iou = self._decode(s, points, t.logits)
            tiles[s] = replace(t, logits=logits, iou=iou)
        for s in new_starts:
            prompt = tiling.mask_prompt_from(tiles, s, self._ops)
            points = tiling.points_for(state, None, s, click, self.point_policy)
            logits, iou = self._decode(s, points, prompt)
            tiles[s] = _Tile(s, logits, (), iou)
        changed = touched + new_starts
        limited = False
        if self.propagate and state.box is None:
            limited = tiling.propagate(
                tiles,
                changed,
                state.clicks + (click,),
                lattice=self._lattice,
                max_crops=self.max_crops,
                point_policy=self.point_policy,
                decode=self._decode,
                ops=self._ops,
            )
        return _State(
            tiles=tiles, clicks=state.clicks + (click,), box=state.box, at_crop_limit=limited
        )

    _upsampled_part = staticmethod(_paste.upsampled_part)

    def _render(self, state: _State) -> Result:
        vol = self.volume
        assert vol is not None
        result = _paste.render(
            state,
            self._lattice,
            vol,
            self._last_region,
            self._weights,
            self.paste_interpolation,
            self._ops,
        )
        self._last_region = result.region
        return result

    _upsampled_part = staticmethod(_paste.upsampled_part)
