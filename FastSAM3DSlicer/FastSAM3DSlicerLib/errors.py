"""The Lib's exception root: every error the Lib raises on purpose for the user derives from
:class:`FastSAM3DSlicerError` (keeping its builtin base: ``ValueError`` for a prompt or an
input the user can change, ``RuntimeError`` for a state or a backend), so the Widget can show
them with one ``except``. Qt-free and Slicer-free (a leaf: imports nothing)."""

from __future__ import annotations

__all__ = ["FastSAM3DSlicerError"]


class FastSAM3DSlicerError(Exception):
    """Root of the FastSAM3DSlicer Lib's errors."""
