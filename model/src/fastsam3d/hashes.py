"""SHA-256 of files, and the hash record (``hashes.json``) a weights cache keeps beside its
files.

The record is the only evidence of what was downloaded (trust on first use, see
:mod:`fastsam3d.hub`), so it is read strictly (an unreadable record is an error, never
"repaired" by overwriting), written atomically, and updated under a lock file so that two
processes downloading into one cache do not lose each other's entries. Torch-free.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .atomic import atomic_path
from .errors import ChecksumError, HubError

__all__ = [
    "HASHES_FILE",
    "LOCK_FILE",
    "new_record",
    "normalize_sha256",
    "read_records",
    "set_record",
    "sha256_file",
    "verify_file",
]

HASHES_FILE = "hashes.json"
LOCK_FILE = ".hashes.lock"
_RECORD_FORMAT = 1
_CHUNK = 1 << 20


def normalize_sha256(value: str) -> str:
    """Lower-case 64-digit hex; accepts Slicer's ``SHA256:`` prefix so its strings can be reused."""
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:") :]
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError(f"not a SHA-256 hex digest (64 hex digits expected): {value!r}")
    return v


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | os.PathLike[str], expected_sha256: str) -> str:
    """Raise ChecksumError unless the file's SHA-256 is ``expected_sha256``; return the digest."""
    expected = normalize_sha256(expected_sha256)
    digest = sha256_file(path)
    if digest != expected:
        raise ChecksumError(f"{path}: SHA-256 is {digest}, expected {expected}")
    return digest


def read_records(directory: Path) -> dict[str, dict]:
    """``{file name: record}`` of ``directory``'s hash record ({} when there is none); an
    unreadable record raises HubError and is left untouched."""
    path = directory / HASHES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        data, err = None, str(e)
    except OSError as e:  # a directory in its place, no permission, ...
        data, err = None, e.strerror or str(e)
    else:
        err = "unexpected layout"
    files = data.get("files") if isinstance(data, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
    )
    if not ok:
        # It is the only evidence of what was downloaded: never "repair" it by overwriting.
        raise HubError(
            f"the hash record {path} is unreadable ({err}); it is left untouched. Fix or delete "
            "it, then re-download the weights with `fastsam3d download NAME --force`."
        )
    return files


@contextlib.contextmanager
def _records_lock(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of hashes.json between processes (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: os.replace keeps the file whole; a lost update is the risk
        yield
        return
    try:
        lock = open(directory / LOCK_FILE, "a")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise HubError(f"cannot lock the hash record in {directory} ({e.strerror or e})") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def set_record(directory: Path, filename: str, entry: dict | None) -> bool:
    """Store (or with None, delete) one record; returns whether anything changed."""
    with _records_lock(directory):
        files = read_records(directory)
        if entry is None:
            if filename not in files:
                return False
            del files[filename]
        else:
            files[filename] = entry
        try:
            _write_json_atomic(directory / HASHES_FILE, {"format": _RECORD_FORMAT, "files": files})
        except OSError as e:
            raise HubError(
                f"cannot write the hash record {directory / HASHES_FILE} ({e.strerror or e})"
            ) from None
    return True


def new_record(url: str, digest: str, size: int, pinned: bool) -> dict:
    """One record: the file's SHA-256 and size, where it came from, when, and whether the hash
    was pinned by the caller (rather than trusted on first use)."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"sha256": digest, "size": size, "url": url, "recorded": now, "pinned": pinned}
