"""Atomic file writes, shared by the CLI's outputs (masks, previews), checkpoint export, the
weights hub and distill's training checkpoints (stdlib only: the hub must work before torch is
installed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "current_umask", "same_file"]

_UMASK_LOCK = threading.Lock()


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: the same inode (hard links, symlinks) or, when one does
    not exist yet, the same resolved path. Outputs are checked against every input with it."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:  # elsewhere: set and restore (process-wide, hence the lock)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # directory fsync: POSIX only
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; when the block succeeds, move it
    into place with one rename, so a crash, a full disk or a failed check inside the block never
    leaves a half-written file where a good one was (or anything at all when there was none).

    The temporary path has ``path``'s exact file name, inside a hidden folder beside ``path``
    (same filesystem, so the rename is atomic): writers that pick the format from the suffix
    (SimpleITK, matplotlib) work unchanged, and so do formats with a companion data file
    (``.nhdr`` + ``.raw.gz``, ``.mhd`` + ``.raw``): companions are moved first, ``path`` last.
    Files get the mode the umask gives (0666 & ~umask), as a plain ``open`` would, and are
    fsynced before the rename. A destination that is an existing folder is refused by the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        yield tmp
        if not tmp.is_file():
            raise OSError(f"nothing was written for {path}")
        mode = 0o666 & ~current_umask()
        written = sorted(p for p in tmpdir.iterdir() if p.is_file())
        for p in written:
            os.chmod(p, mode)
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        for p in sorted(written, key=lambda p: p == tmp):  # companions first, the file last
            os.replace(p, path.parent / p.name)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
