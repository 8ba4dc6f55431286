"""The package's exception root, and the errors the CLI maps to exit codes.

Every error fastsam3d raises on purpose derives from :class:`FastSAM3DError`, so a caller can
catch all of them in one clause. Each also keeps the builtin base callers already catch:
``ValueError`` for bad input (:class:`VolumeError`, ``SessionError``, ``PromptError``,
``WireError``), ``RuntimeError`` for a failed operation (``CheckpointError``, ``HubError``,
``RemoteError``). A leaf module (imports nothing, no torch): the torch-free readers, the hub and
the remote client import it before torch is installed. The weights cache's errors live here
because two modules raise them (:mod:`fastsam3d.hub`, :mod:`fastsam3d.hashes`); the hub
re-exports them.
"""

from __future__ import annotations

__all__ = [
    "FastSAM3DError",
    "VolumeError",
    "CommandError",
    "UsageError",
    "HubError",
    "DownloadError",
    "ChecksumError",
    "DownloadCancelled",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
]

# The CLI's exit statuses (``fastsam3d.cli.exit_status``); 2 is also argparse's own.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class FastSAM3DError(Exception):
    """Root of every error fastsam3d raises on purpose."""


class VolumeError(FastSAM3DError, ValueError):
    """The image cannot be segmented as given (shape, values or geometry)."""


class CommandError(FastSAM3DError):
    """A CLI command's failure: ``fastsam3d.cli.main`` prints ``fastsam3d COMMAND: message`` on
    stderr and exits with ``code`` (1 unless given)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = int(code)


class UsageError(CommandError, ValueError):
    """A command line that cannot be run as given (an option, a prompt, an output path): exit
    status 2, as argparse's own usage errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class HubError(FastSAM3DError, RuntimeError):
    """The weights cache or a download failed (``fastsam3d.hub``); base of the three below."""


class DownloadError(HubError):
    """The transfer failed (network error, HTTP error, truncated body); nothing was kept."""


class ChecksumError(HubError):
    """A file's SHA-256 does not match the pinned or recorded one, or cannot be checked."""


class DownloadCancelled(HubError):
    """The progress callback returned False; the partial file was deleted."""
