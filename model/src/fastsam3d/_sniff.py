"""What a weights file is, from its bytes, without torch and without unpickling anything.

Shared by :mod:`fastsam3d.hub` (which must work before torch is installed, and checks every
download before it is moved into the cache) and :mod:`fastsam3d.checkpoint` (which checks a
file before ``torch.load`` or ``safe_open`` touches it). A file is one of:

* a PyTorch zip archive (``torch.save`` since torch 1.6): the archive must open (a truncated
  file has no central directory), hold one ``data.pkl``, and its entries must not inflate beyond
  the file's own size (torch stores entries uncompressed; a deflated entry is a memory bomb);
* a safetensors file: the JSON header is parsed and every tensor's dtype, shape and byte range
  checked against the file size before any tensor is read;

and everything else (HTML pages, text, raw or pre-1.6 pickles, random bytes) is refused with a
sentence saying what it looks like.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from .errors import FastSAM3DError

__all__ = ["CheckpointError", "SAFETENSORS_DTYPES", "safetensors_header", "sniff"]

#: bytes per element of every dtype a safetensors header may name
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit for the JSON header
_ARCHIVES = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz
_ZIP_SLACK = 1 << 16  # zip bookkeeping may make the listed sizes exceed the file by a little


class CheckpointError(FastSAM3DError, RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the network."""


def sniff(path: str | os.PathLike[str], name: str | None = None) -> str:
    """``"zip"`` or ``"safetensors"`` for a file that passes the checks above; anything else
    raises CheckpointError naming the file (``name``, default the path) and what it is."""
    path = Path(path)
    shown = name or str(path)
    if path.is_dir():
        raise CheckpointError(f"{shown} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {shown}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{shown} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        _check_zip(path, size, shown)
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        # a "{" at byte 8 may be chance: an archive whose first 8 bytes are no header length
        # that fits is named as the archive it is (a truncated safetensors keeps its message)
        fits = int.from_bytes(head[:8], "little") <= size - 8
        if fits or not head.startswith(_ARCHIVES):
            safetensors_header(path, shown)
            return "safetensors"
    raise CheckpointError(
        f"{shown} is not a checkpoint (refused unread): it {_describe(head, size)}"
    )


def _describe(head: bytes, size: int) -> str:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")) or (
        stripped.startswith(b"<") and b"html" in head.lower()
    ):
        return (
            "is an HTML/XML page (an error, login or captive-portal page served instead "
            "of the file?)"
        )
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            "is a raw pickle or a pre-1.6 PyTorch file; only the zip format of torch.save "
            "(torch >= 1.6) and safetensors are read. Re-save it with a current torch"
        )
    if head.startswith(_ARCHIVES):
        return "is a compressed archive (gzip/bzip2/xz); unpack it first"
    try:
        head.decode("utf-8")
        text = all(c >= 32 or c in (9, 10, 13) for c in head)
    except UnicodeDecodeError:
        text = False
    if text:
        return f"is a text file ({size} bytes) starting {head[:40]!r}"
    return f"has an unknown format ({size} bytes; first bytes {head[:8].hex(' ')})"


def _check_zip(path: Path, size: int, shown: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{shown} is a truncated or damaged zip archive ({e}); download or copy it again"
        ) from None
    pickles = [i.filename for i in infos if i.filename.endswith("data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{shown} is a zip archive but not a PyTorch checkpoint (expected one data.pkl, "
            f"found {len(pickles)})"
        )
    inflated = sum(i.file_size for i in infos)
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed or inflated > size + _ZIP_SLACK:
        raise CheckpointError(
            f"{shown}: its zip entries claim {inflated} bytes in a {size}-byte file "
            f"(compressed entries: {packed[:3]}); torch.save never compresses, so this file "
            "would inflate in memory: refused"
        )


def safetensors_header(
    path: str | os.PathLike[str], name: str | None = None
) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, every entry checked against the file:
    known dtype, non-negative integer shape, byte range inside the data and of the size the
    shape implies, no two ranges overlapping. Raises CheckpointError otherwise."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{name or path} is not a valid safetensors file: {why}")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad(f"{size} bytes is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise bad(f"header length {n} does not fit the {size}-byte file")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    data = size - 8 - n
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise bad(f"tensor {name!r} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data:
            raise bad(
                f"tensor {name!r} lies at bytes {begin}..{end}, outside the {data} "
                "data bytes (truncated file?)"
            )
        if end - begin != numel * SAFETENSORS_DTYPES[dtype]:
            raise bad(
                f"tensor {name!r} is {dtype} {shape} ({numel} elements) but has {end - begin} bytes"
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, e0, a), (b1, _, b) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise bad(f"tensors {a!r} and {b!r} overlap")
    return header, meta
