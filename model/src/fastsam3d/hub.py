"""A per-user weights cache and downloads that never leave a partial or unverified file where a
caller would load it.

Which weights exist (names, URLs, the config each runs with) is :mod:`fastsam3d.weights`; this
module caches and verifies them. ``WeightsInfo`` and ``list_weights`` are re-exported here, where
callers (the Slicer module) have always found them, and ``get_weights_info`` stays as a
deprecated alias of ``get_weights``. The hash record and file hashing are :mod:`fastsam3d.hashes`,
the errors :mod:`fastsam3d.errors` (both re-exported here).

Trust model. No checksums are published for the FastSAM3D or SAM-Med3D weights, so the first
download is trusted (trust on first use): its SHA-256 goes into ``hashes.json`` beside the file,
and every later :func:`cached_path` / :func:`download` re-hashes the file against that record, so
a file truncated, corrupted or swapped afterwards is refused instead of loaded. A pinned hash
(the ``sha256=`` argument, or a registry entry's ``sha256``) is checked before the file is moved
into place.

The bytes themselves are streamed by :mod:`fastsam3d.transfer` (SHA-256 while reading,
cancel, socket timeout, truncation check).

A download is checked to be a checkpoint (:func:`fastsam3d._sniff.sniff`: a PyTorch zip or a
safetensors file, nothing that inflates, no HTML page answered with status 200) before it is
moved into place or recorded. Names and URLs never share a file: registry weights live in the
cache directory under their registry file name, and a URL's download under
``urls/<first 16 hex digits of the URL's SHA-256>/<file name>``, so no download can take over
what a registry name resolves to; a registry file whose record names another URL is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import sys
import time
import urllib.parse
import uuid
import warnings
from pathlib import Path, PurePosixPath

from ._sniff import CheckpointError, sniff
from .errors import ChecksumError, DownloadCancelled, DownloadError, HubError
from .hashes import (
    HASHES_FILE,
    LOCK_FILE,
    new_record,
    normalize_sha256,
    read_records,
    set_record,
    sha256_file,
    verify_file,
)
from .transfer import ProgressCallback
from .transfer import fetch as _fetch
from .weights import WeightsInfo, get_weights, list_weights

__all__ = [
    "ENV_CACHE",
    "HASHES_FILE",
    "CacheStatus",
    "ChecksumError",
    "DownloadCancelled",
    "DownloadError",
    "HubError",
    "WeightsInfo",
    "cache_dir",
    "cache_status",
    "cached_path",
    "download",
    "get_weights_info",
    "list_weights",
    "normalize_sha256",
    "remove",
    "sha256_file",
    "url_downloads",
    "verify_file",
]

ENV_CACHE = "FASTSAM3D_CACHE"
_STALE_PART_S = 3600.0  # leftover .part files older than this belong to no live download
_URL_DIR = "urls"  # URL downloads: <cache>/urls/<hash of the URL>/<file name>


def get_weights_info(name: str) -> WeightsInfo:
    """Deprecated: the old name of :func:`fastsam3d.weights.get_weights` (the Slicer Lib calls
    it here)."""
    warnings.warn(
        "fastsam3d.hub.get_weights_info() is deprecated; use fastsam3d.get_weights()",
        DeprecationWarning,
        stacklevel=2,
    )
    return get_weights(name)


def cache_dir(create: bool = True) -> Path:
    """The per-user weights cache: $FASTSAM3D_CACHE, else the platform's user cache directory.

    ``create=False`` lets read-only callers (``fastsam3d info``) look without leaving a directory.
    """
    env = os.environ.get(ENV_CACHE)
    if env:
        base = Path(env).expanduser()
    elif sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = (Path(local) if local else Path.home() / "AppData" / "Local") / "fastsam3d"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        # The XDG spec says relative values are invalid and must be ignored.
        root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        base = root / "fastsam3d"
    if create:
        _mkdir(base)
    return base


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HubError(
            f"cannot use {d} as the weights cache ({e.strerror or e}); set "
            f"${ENV_CACHE} or --cache-dir to a writable directory"
        ) from None


# --------------------------------------------------------------------------------------------
# name / URL resolution


@dataclasses.dataclass(frozen=True)
class _Target:
    key: str  # registry name or URL, as the user gave it (used in hints)
    url: str
    filename: str
    expected: str | None  # pinned SHA-256
    from_registry: bool

    @property
    def subdir(self) -> Path:
        """Where in a cache directory the file lives (URL downloads get their own folder)."""
        if self.from_registry:
            return Path()
        return Path(_URL_DIR, hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16])


def _is_url(value: str) -> bool:
    return urllib.parse.urlsplit(value).scheme.lower() in ("http", "https", "file")


def _filename_from_url(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    bad = (
        not name
        or name in (".", "..")
        or name.startswith(".")  # our temporary files are hidden; keep the namespaces apart
        or name == HASHES_FILE
        or "\\" in name
        or "\x00" in name
    )
    if bad:
        raise ValueError(f"cannot derive a safe cache file name from URL {url!r}")
    return name


def _resolve(name_or_url: str, sha256: str | None) -> _Target:
    pin = normalize_sha256(sha256) if sha256 is not None else None
    if _is_url(name_or_url):
        return _Target(name_or_url, name_or_url, _filename_from_url(name_or_url), pin, False)
    info = get_weights(name_or_url)
    registered = normalize_sha256(info.sha256) if info.sha256 else None
    if pin and registered and pin != registered:
        raise ValueError(
            f"sha256={pin} conflicts with the registered SHA-256 {registered} of {info.name!r}"
        )
    return _Target(info.name, info.url, info.filename, pin or registered, True)


# --------------------------------------------------------------------------------------------
# cache queries


def _directory(
    dest_dir: str | os.PathLike[str] | None, create: bool, target: _Target | None = None
) -> Path:
    base = cache_dir(create=False) if dest_dir is None else Path(dest_dir).expanduser()
    d = base / target.subdir if target is not None else base
    if create:
        _mkdir(d)
    return d


def _hint(target: _Target) -> str:
    return f"re-download it with `fastsam3d download {target.key} --force`"


def _check_existing(target: _Target, path: Path, record: dict | None) -> str:
    """Verify an existing file against the pin, else its record, and that it is a checkpoint;
    return its digest."""
    if target.expected is None and record is not None and record.get("url") != target.url:
        raise ChecksumError(
            f"{path} was downloaded from {record.get('url')}, not from {target.url} (what "
            f"{target.key!r} names); {_hint(target)}"
        )
    if target.expected is None and record is None:
        raise ChecksumError(
            f"{path} has no recorded SHA-256 (it was not downloaded by fastsam3d, or "
            f"{HASHES_FILE} lost its entry), so it cannot be verified; {_hint(target)}, or "
            f"adopt it by passing its SHA-256 (`fastsam3d download {target.key} --sha256 HEX`)"
        )
    expected = target.expected or record["sha256"]
    what = "the pinned" if target.expected else "the recorded"
    size = path.stat().st_size
    if target.expected is None and isinstance(record.get("size"), int) and size != record["size"]:
        raise ChecksumError(
            f"{path} is {size} bytes but {record['size']} bytes were recorded at download: the "
            f"file was changed or truncated afterwards; {_hint(target)}"
        )
    digest = sha256_file(path)
    if digest != expected:
        raise ChecksumError(
            f"{path}: SHA-256 is {digest}, not {what} {expected}: the file was changed after it "
            f"was downloaded, or is a different file; {_hint(target)}"
        )
    _require_checkpoint(path, target, ChecksumError)
    return digest


def _require_checkpoint(path: Path, target: _Target, error: type[HubError], what: str = "") -> None:
    try:
        sniff(path, name=what or str(path))
    except CheckpointError as e:
        raise error(
            f"{e}; {_hint(target)}" if error is ChecksumError else f"{e}; nothing was kept"
        ) from None


def cached_path(
    name: str,
    verify: bool = True,
    *,
    sha256: str | None = None,
    dest_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """The cached file for a registry name or URL, or None when it is not downloaded.

    With ``verify`` the file is re-hashed against the pinned or recorded SHA-256 and a mismatch
    (or a file with no record) raises ChecksumError: a present but untrusted file is not "absent".
    """
    target = _resolve(name, sha256)
    directory = _directory(dest_dir, create=False, target=target)
    path = directory / target.filename
    if not path.is_file():
        return None
    if verify:
        _check_existing(target, path, read_records(directory).get(target.filename))
    return path


@dataclasses.dataclass(frozen=True)
class CacheStatus:
    """What ``fastsam3d info`` / ``download --list`` and the Slicer panel show for one entry."""

    name: str
    path: Path
    present: bool
    size: int | None  # bytes on disk
    recorded_sha256: str | None
    verified: bool | None  # None: not checked (verify=False) or not present
    error: str | None  # why it is not usable, when known


def cache_status(
    name: str, *, verify: bool = False, dest_dir: str | os.PathLike[str] | None = None
) -> CacheStatus:
    """Cache state without raising for cache problems (an unknown name is still a ValueError);
    hashing (``verify``) is opt-in because it reads the file."""
    target = _resolve(name, None)
    directory = _directory(dest_dir, create=False, target=target)
    path = directory / target.filename
    try:
        present = path.is_file()
        size = path.stat().st_size if present else None
    except OSError as e:
        return CacheStatus(name, path, False, None, None, None, f"cannot read the cache: {e}")
    try:
        record = read_records(directory).get(target.filename)
    except HubError as e:
        return CacheStatus(name, path, present, size, None, False if present else None, str(e))
    recorded = record["sha256"] if record else None
    verified: bool | None = None
    error = None
    if present and record is None and target.expected is None:
        verified, error = False, f"no recorded SHA-256 for {path.name}"
    elif (
        present
        and record is not None
        and target.expected is None
        and record.get("url") != target.url
    ):
        verified = False
        error = f"downloaded from {record.get('url')}, not from {target.url}"
    elif present and verify:
        try:
            _check_existing(target, path, record)
            verified = True
        except (HubError, OSError) as e:
            verified, error = False, str(e)
    elif present and record is not None and record.get("size") not in (None, size):
        verified, error = False, f"size {size} differs from the recorded {record['size']} bytes"
    return CacheStatus(name, path, present, size, recorded, verified, error)


# --------------------------------------------------------------------------------------------
# download


def download(
    name_or_url: str,
    *,
    sha256: str | None = None,
    progress: bool = True,
    force: bool = False,
    dest_dir: str | os.PathLike[str] | None = None,
    progress_callback: ProgressCallback | None = None,
) -> Path:
    """Download registry weights (or any http(s)/file URL) into the cache; return its path.

    An existing file is reused after verification (pinned hash, else the recorded one). A fresh
    transfer goes to a hidden temporary file in the destination directory and is moved over the
    destination with ``os.replace`` only once complete and matching the pin, so a failed, cut or
    cancelled download leaves the previous file (if any) untouched and nothing partial behind.
    ``progress_callback(done_bytes, total_bytes_or_None)`` returning False cancels
    (DownloadCancelled).
    """
    target = _resolve(name_or_url, sha256)
    directory = _directory(dest_dir, create=False, target=target)
    fresh = not target.from_registry and not directory.exists()
    _mkdir(directory)
    try:
        return _download(target, directory, progress, force, progress_callback)
    except BaseException:
        if fresh:  # a failed URL download leaves not even its empty folder behind
            with contextlib.suppress(OSError):
                directory.rmdir()
                directory.parent.rmdir()  # urls/, when it holds nothing else
        raise


def _download(
    target: _Target,
    directory: Path,
    progress: bool,
    force: bool,
    progress_callback: ProgressCallback | None,
) -> Path:
    dest = directory / target.filename
    # Read the record first: an unreadable record must stop us before any network traffic.
    record = read_records(directory).get(target.filename)
    lock = directory / LOCK_FILE
    if lock.exists() and not lock.is_file():  # nor one we could never update
        raise HubError(
            f"cannot lock the hash record in {directory}: {lock} is not a file; delete it"
        )

    if dest.exists() and not force:
        if target.expected is None:  # also refuses a file recorded from another URL
            _check_existing(target, dest, record)
            return dest
        digest = sha256_file(dest)
        if digest == target.expected:
            _require_checkpoint(dest, target, ChecksumError)
            if record is None or record["sha256"] != digest or record.get("url") != target.url:
                entry = new_record(target.url, digest, dest.stat().st_size, pinned=True)
                set_record(directory, target.filename, entry)
            return dest
        # The existing file is not the pinned one: fetch; it stays until the new one verifies.

    tmp = directory / f".{target.filename}.{uuid.uuid4().hex}.part"
    try:
        digest, size = _fetch(target.url, tmp, progress, progress_callback, target.filename)
        if target.expected is not None and digest != target.expected:
            raise ChecksumError(
                f"downloaded {target.url}: SHA-256 is {digest}, not the pinned {target.expected}; "
                "the file was discarded"
            )
        _require_checkpoint(tmp, target, DownloadError, what=f"the download from {target.url}")
        upstream_changed = (
            target.expected is None
            and record is not None
            and record.get("url") == target.url
            and record["sha256"] != digest
        )
        if upstream_changed:
            # Not an error (forced re-download, nothing pinned), but the user should know.
            warnings.warn(
                f"{target.filename}: the new download differs from the one recorded on "
                f"{record.get('recorded', '?')} (SHA-256 {record['sha256']} -> {digest}); the "
                "upstream file has changed. Recording the new hash.",
                stacklevel=2,
            )
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise DownloadError(
                f"cannot move the download into {dest} ({e.strerror or e}); nothing was kept"
            ) from None
    finally:
        # EROFS, not ENOENT, on a read-only file system: never let cleanup hide the real error.
        with contextlib.suppress(OSError):
            tmp.unlink()
    pinned = target.expected is not None
    set_record(directory, target.filename, new_record(target.url, digest, size, pinned))
    return dest


def url_downloads(dest_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """(URL, path) of every file downloaded by URL into the cache (``download --list`` shows
    them; load them by path, remove them by URL). Unreadable records are skipped."""
    base = cache_dir(create=False) if dest_dir is None else Path(dest_dir).expanduser()
    found = []
    for record_file in sorted(
        glob.glob(os.path.join(glob.escape(str(base)), _URL_DIR, "*", HASHES_FILE))
    ):
        directory = Path(record_file).parent
        try:
            records = read_records(directory)
        except HubError:
            continue
        for filename, record in sorted(records.items()):
            if (directory / filename).is_file() and isinstance(record.get("url"), str):
                found.append((record["url"], directory / filename))
    return found


def remove(name: str, *, dest_dir: str | os.PathLike[str] | None = None) -> bool:
    """Delete a cached file, its hash record and stale partial downloads; True if any existed."""
    target = _resolve(name, None)
    directory = _directory(dest_dir, create=False, target=target)
    if not directory.is_dir():
        return False
    removed = False
    path = directory / target.filename
    if path.is_file():
        try:
            path.unlink()
        except OSError as e:
            raise HubError(f"cannot delete {path} ({e.strerror or e})") from None
        removed = True
    # Leftovers of a killed process; a recent one may belong to a download still running.
    pattern = os.path.join(glob.escape(str(directory)), f".{glob.escape(target.filename)}.*.part")
    for part in glob.glob(pattern):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(part) > _STALE_PART_S:
                os.unlink(part)
                removed = True
    if (directory / HASHES_FILE).exists() and set_record(directory, target.filename, None):
        removed = True
    return removed
