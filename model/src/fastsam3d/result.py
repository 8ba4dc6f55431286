"""What a session returns, torch-free: :class:`Result`, :class:`SessionError`, :func:`paste_result`.

Kept apart from :mod:`fastsam3d.session` so that a client without torch (the remote session
in Slicer, the CLI's ``--server`` mode) returns and raises the very same types as a local
session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import FastSAM3DError

__all__ = ["Region", "Result", "SessionError", "paste_result"]

Region = tuple[slice, slice, slice]


class SessionError(FastSAM3DError, ValueError):
    """A prompt or call the session cannot act on; the session's state is unchanged."""


@dataclass(frozen=True)
class Result:
    """The object's current mask, as the part of the volume it may have changed.

    ``region`` also covers what the previous result covered, so pasting it clears voxels a
    correction removed.
    """

    region: Region
    mask: np.ndarray = field(repr=False)  # bool, shape of the region (not in repr: large)
    shape: tuple[int, int, int]  # the whole volume, [k, j, i]
    crops: int = 0
    iou: float | None = None
    at_crop_limit: bool = False  # the mask reaches a crop face but max_crops stopped it

    def full_mask(self) -> np.ndarray:
        """Bool array of the whole volume."""
        out = np.zeros(self.shape, dtype=bool)
        out[self.region] = self.mask
        return out

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    def __repr__(self) -> str:  # the mask itself would print millions of values
        box = ", ".join(f"{s.start}:{s.stop}" for s in self.region)
        return (
            f"Result(voxels={self.voxels}, region=[{box}], shape={self.shape}, "
            f"crops={self.crops}, iou={self.iou}, at_crop_limit={self.at_crop_limit})"
        )


def paste_result(
    result: Result, labelmap: np.ndarray, value: int = 1, erase: bool = True
) -> np.ndarray:
    """Write ``result`` into a caller-owned labelmap, in place.

    Only ``result.region`` is touched. Inside it the mask's voxels get ``value``; with ``erase``
    voxels that hold ``value`` but are no longer in the mask are set to 0 (a correction that
    shrank the object). Voxels of other labels outside the mask are kept; inside the mask
    they become ``value`` (the mask wins).

    Args:
        result: A session's ``Result`` for the volume the labelmap covers.
        labelmap: Integer array of the whole volume, shape ``result.shape`` in [k, j, i]
            (slice, row, column) order like ``Volume.array``; its dtype must hold ``value``.
        value: The label the mask's voxels get.
        erase: Also reset to 0 the voxels of ``result.region`` that hold ``value`` but are not
            in the mask.

    Returns:
        ``labelmap`` itself.

    Raises:
        ValueError: ``labelmap``'s shape is not the volume's.
    """
    if tuple(labelmap.shape) != tuple(result.shape):
        raise ValueError(
            f"labelmap shape {labelmap.shape} does not match the volume {result.shape}"
        )
    sub = labelmap[result.region]
    if erase:
        sub[(sub == value) & ~result.mask] = 0
    sub[result.mask] = value
    return labelmap
