"""The distill package's exception root.

:class:`DistillError` derives from :class:`fastsam3d.FastSAM3DError`, so one ``except`` catches
errors of both packages. The ``fastsam3d-distill`` command maps errors to exit statuses in one
place (:func:`fastsam3d_distill.cli.main`): input problems 2 with one line on stderr, Ctrl-C 130.
"""

from __future__ import annotations

from fastsam3d.errors import FastSAM3DError

__all__ = ["DistillError", "DistillUsageError"]


class DistillError(FastSAM3DError):
    """Root of every error fastsam3d-distill raises on purpose."""


class DistillUsageError(DistillError, ValueError):
    """A command line or data set that cannot be run as given (exit status 2)."""
