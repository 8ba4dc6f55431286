"""One download streamed into a file: SHA-256 while reading, cancel, socket timeout, and a
transfer cut short refused.

Why our own streaming loop rather than ``torch.hub.download_url_to_file``: that function moves a
*truncated* transfer into place without complaint. On Python 3.11 ``http.client`` returns ``b""``
when a Content-Length response is cut short instead of raising, and torch.hub never compares the
byte count with Content-Length (checked against a loopback server sending 400 of 1000 bytes).
It also has no way to cancel (the Slicer module's progress dialog needs one) and no socket
timeout. This loop keeps its good parts (urllib, temporary file in the destination
directory, tqdm bar) and adds those three.

"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .errors import DownloadCancelled, DownloadError

__all__ = ["ProgressCallback", "fetch"]

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0  # per socket operation, not for the whole transfer

#: ``callback(done_bytes, total_bytes_or_None)``; returning False cancels the download.
ProgressCallback = Callable[[int, Optional[int]], Optional[bool]]  # noqa: UP045 (Python 3.9)


def _content_length(response: object) -> int | None:
    value = response.headers.get("Content-Length")  # type: ignore[attr-defined]
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is not None and n >= 0 else None


def fetch(
    url: str,
    tmp: Path,
    progress: bool,
    callback: ProgressCallback | None,
    label: str,
) -> tuple[str, int]:
    """Stream ``url`` into ``tmp`` (created here, exclusively); return (sha256, size).

    ``callback(done_bytes, total_bytes_or_None)`` is called before the first and after every
    chunk; returning False cancels (DownloadCancelled). A web page instead of a file, an HTTP
    error, a dropped connection, a transfer shorter than its Content-Length or an empty body
    raise DownloadError. The caller deletes ``tmp`` on any error.
    """
    from tqdm.auto import tqdm

    version = getattr(sys.modules.get("fastsam3d"), "__version__", "unknown")
    request = urllib.request.Request(url, headers={"User-Agent": f"fastsam3d/{version}"})
    h = hashlib.sha256()
    done = 0
    total: int | None = None

    def notify() -> None:
        if callback is not None and callback(done, total) is False:
            raise DownloadCancelled(f"download of {url} cancelled after {done} bytes")

    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            kind = response.headers.get_content_type()
            if kind in ("text/html", "application/xhtml+xml"):
                raise DownloadError(
                    f"downloading {url} failed: the server answered with a web page "
                    f"({kind}), not weights (a login, error or captive-portal page?); "
                    "nothing was kept"
                )
            total = _content_length(response)
            with (
                open(tmp, "xb") as f,
                tqdm(
                    total=total,
                    disable=not progress,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=label,
                    leave=True,
                ) as bar,
            ):
                notify()
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                    notify()
                f.flush()
                os.fsync(f.fileno())
    except urllib.error.HTTPError as e:
        e.close()  # it holds the response's socket
        raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        # Socket timeouts and resets are OSErrors; IncompleteRead is an HTTPException.
        raise DownloadError(f"downloading {url} failed after {done} bytes: {e}") from e
    if total is not None and done != total:
        raise DownloadError(
            f"downloading {url} failed: the transfer ended after {done} of {total} bytes "
            "(connection dropped?); nothing was kept"
        )
    if done == 0:
        raise DownloadError(f"downloading {url} failed: the server sent an empty file")
    return h.hexdigest(), done
