"""The remote session's wire format, torch-free (numpy + stdlib; ``zstandard`` when installed).

Volume upload: the array's C-order bytes are cut into chunks of ``chunk_bytes`` (16 MiB by
default) and each chunk is compressed on its own (zstd, or zlib where ``zstandard`` is missing,
e.g. a bare Slicer), so a large CT streams in several bounded requests and the server never
holds more than one compressed chunk plus the volume. Every size is declared up front and every
decompression is capped at the size it must have, so a bad or hostile payload fails with a
clear error instead of exhausting memory.

Results: only the region a prompt may have changed (``Result.region``) travels, as the mask's
bits (``numpy.packbits``, in the array's memory order, C or F) compressed with the same codecs,
in a small JSON object.
"""

from __future__ import annotations

import base64
import math
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import FastSAM3DError
from .result import Result

__all__ = [
    "WireError",
    "CODECS",
    "available_codecs",
    "pick_codec",
    "compress",
    "decompress",
    "volume_header",
    "volume_chunks",
    "VolumeAssembler",
    "encode_result",
    "decode_result",
    "DTYPES",
    "CHUNK_BYTES",
]

try:  # optional: the server always has it (extra "serve"); a client falls back to zlib
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised where zstandard is absent
    _zstd = None

_local = threading.local()  # zstd contexts are reused per thread (not thread-safe to share)

CODECS = ("zstd", "zlib")
CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_BYTES = 2**16
MAX_CHUNK_BYTES = 64 * 2**20
# Little-endian scalar types a volume may travel as (numpy ``dtype.str``); anything else is
# converted by the client (big-endian swapped, bool as uint8), as a local session would accept.
DTYPES = ("|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")


class WireError(FastSAM3DError, ValueError):
    """A payload that does not follow the wire format (sizes, codec, shape, encoding)."""


def available_codecs() -> list[str]:
    """Codecs this process can encode and decode, preferred first."""
    return [c for c in CODECS if c != "zstd" or _zstd is not None]


def pick_codec(offered: Sequence[str] | None = None) -> str:
    """The first codec of ``offered`` (the peer's preference) that this side supports."""
    mine = available_codecs()
    for c in offered if offered is not None else mine:
        if c in mine:
            return c
    raise WireError(
        f"no common compression codec: offered {list(offered or [])}, supported here {mine}"
    )


def compress(data: bytes, codec: str, level: int = 1) -> bytes:
    """Compress ``data`` (level 1: the transfer is bound by the network, not the ratio)."""
    if codec == "zstd" and _zstd is not None:
        key = f"zstd{level}"
        cctx = getattr(_local, key, None)
        if cctx is None:
            cctx = _zstd.ZstdCompressor(level=level, write_content_size=True)
            setattr(_local, key, cctx)
        return cctx.compress(data)
    if codec == "zlib":
        return zlib.compress(data, level)
    raise WireError(f"unknown or unavailable codec {codec!r} (have {available_codecs()})")


def decompress(data: bytes, codec: str, size: int) -> bytes:
    """Decompress ``data`` that must expand to exactly ``size`` bytes, never more."""
    try:
        if codec == "zstd" and _zstd is not None:
            dctx = getattr(_local, "dzstd", None)
            if dctx is None:
                dctx = _local.dzstd = _zstd.ZstdDecompressor()
            out = dctx.decompress(data, max_output_size=size)
        elif codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, size)
            if d.unconsumed_tail or not d.eof:
                raise WireError(
                    f"zlib data expands beyond the declared {size} bytes or is truncated"
                )
        else:
            raise WireError(f"unknown or unavailable codec {codec!r} (have {available_codecs()})")
    except WireError:
        raise
    except Exception as e:  # zstd.ZstdError, zlib.error: corrupt or oversized data
        raise WireError(
            f"cannot decompress {codec} data of {len(data)} bytes into {size} bytes: {e}"
        ) from None
    if len(out) != size:
        raise WireError(f"{codec} data expands to {len(out)} bytes, expected {size}")
    return out


# --- volume upload -----------------------------------------------------------------------
def wire_array(array: np.ndarray) -> np.ndarray:
    """The array as it travels: C-contiguous, little-endian, one of :data:`DTYPES`."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype.str not in DTYPES:
        raise WireError(f"volume dtype {a.dtype} cannot be sent; use an integer or float type")
    return np.ascontiguousarray(a)


def volume_header(
    array: np.ndarray, ijk_to_ras: Any, codec: str, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, Any]:
    """The JSON header announcing an upload of ``array`` (already :func:`wire_array`)."""
    return {
        "shape": [int(s) for s in array.shape],
        "dtype": array.dtype.str,
        "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64).tolist(),
        "codec": codec,
        "chunk_bytes": int(chunk_bytes),
    }


def volume_chunks(array: np.ndarray, codec: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Compressed chunks of ``array``'s bytes, in order (one chunk held in memory at a time)."""
    flat = memoryview(array).cast("B")
    for start in range(0, max(len(flat), 1), chunk_bytes):
        yield compress(bytes(flat[start : start + chunk_bytes]), codec)


class VolumeAssembler:
    """Server side of an upload: validates the header, then fills chunks into one buffer.

    ``max_bytes`` bounds the uncompressed volume; the buffer is allocated only after the
    header passed every check.
    """

    def __init__(
        self, header: dict[str, Any], max_bytes: int, codecs: Sequence[str] = CODECS
    ) -> None:
        shape = header.get("shape")
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        ):
            raise WireError(f"shape must be three integers [k, j, i], got {shape!r}")
        if min(shape) < 1:
            raise WireError(f"shape must be positive, got {list(shape)}")
        dtype = header.get("dtype")
        if dtype not in DTYPES:
            raise WireError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        codec = header.get("codec")
        if codec not in codecs or codec not in available_codecs():
            raise WireError(
                f"codec must be one of {[c for c in codecs if c in available_codecs()]}"
                f", got {codec!r}"
            )
        chunk = header.get("chunk_bytes")
        if not isinstance(chunk, int) or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise WireError(
                f"chunk_bytes must be an integer in [{MIN_CHUNK_BYTES}, "
                f"{MAX_CHUNK_BYTES}], got {chunk!r}"
            )
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        if self.nbytes > max_bytes:
            raise OverflowError(
                f"volume of {self.nbytes / 2**20:.1f} MB ({list(self.shape)} "
                f"{self.dtype}) exceeds the server's upload limit of "
                f"{max_bytes / 2**20:g} MB"
            )
        self.ijk_to_ras = header.get("ijk_to_ras")
        self.codec = codec
        self.chunk_bytes = chunk
        self.chunks = max(1, math.ceil(self.nbytes / chunk))
        self._buffer = bytearray(self.nbytes)
        self._done = [False] * self.chunks

    def chunk_size(self, index: int) -> int:
        """Uncompressed bytes of chunk ``index``."""
        if not 0 <= index < self.chunks:
            raise WireError(
                f"chunk index {index} out of range: the volume has {self.chunks} chunk(s)"
            )
        return min(self.chunk_bytes, self.nbytes - index * self.chunk_bytes)

    def add(self, index: int, data: bytes) -> None:
        size = self.chunk_size(index)
        raw = decompress(data, self.codec, size)
        start = index * self.chunk_bytes
        self._buffer[start : start + size] = raw
        self._done[index] = True

    @property
    def missing(self) -> list[int]:
        return [i for i, ok in enumerate(self._done) if not ok]

    def array(self) -> np.ndarray:
        """The assembled array ([k, j, i], writeable, native byte order)."""
        if self.missing:
            raise WireError(
                f"upload incomplete: chunk(s) {self.missing[:10]} of {self.chunks} not received"
            )
        a = np.frombuffer(self._buffer, dtype=self.dtype).reshape(self.shape)
        return a.astype(self.dtype.newbyteorder("="), copy=False)


# --- results -----------------------------------------------------------------------------
def encode_result(result: Result, codec: str) -> dict[str, Any]:
    """A :class:`Result` as JSON-ready data: region, sizes and the region's mask bits."""
    mask = np.asarray(result.mask, dtype=bool)
    # Bits go in the array's own memory order: the session's masks are often Fortran-ordered
    # (k fastest), and a C-order copy of a CT-sized region costs more than everything else.
    order = "F" if mask.flags.f_contiguous and not mask.flags.c_contiguous else "C"
    flat = mask.T if order == "F" else np.ascontiguousarray(mask)
    bits = np.packbits(flat, axis=None).tobytes()
    return {
        "region": [[int(s.start), int(s.stop)] for s in result.region],
        "shape": [int(n) for n in result.shape],
        "crops": int(result.crops),
        "iou": None if result.iou is None else float(result.iou),
        "at_crop_limit": bool(result.at_crop_limit),
        "mask": {
            "codec": codec,
            "order": order,
            "voxels": int(np.count_nonzero(mask)),
            "data": base64.b64encode(compress(bits, codec)).decode("ascii"),
        },
    }


def decode_result(data: dict[str, Any]) -> Result:
    """Inverse of :func:`encode_result`; checks every size against the declared region."""
    try:
        region = tuple(slice(int(a), int(b)) for a, b in data["region"])
        shape = tuple(int(n) for n in data["shape"])
        m = data["mask"]
        codec, voxels = str(m["codec"]), int(m["voxels"])
        order = str(m.get("order", "C"))
        payload = base64.b64decode(m["data"], validate=True)
        crops, iou = int(data["crops"]), data["iou"]
        limit = bool(data["at_crop_limit"])
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed result: {type(e).__name__}: {e}") from None
    if order not in ("C", "F"):
        raise WireError(f"malformed result: mask order must be 'C' or 'F', got {order!r}")
    if len(region) != 3 or len(shape) != 3:
        raise WireError(f"malformed result: region {data['region']} / shape {shape}")
    if any(s.start < 0 or s.stop < s.start or s.stop > n for s, n in zip(region, shape)):
        raise WireError(f"result region {data['region']} lies outside the volume {list(shape)}")
    size = tuple(s.stop - s.start for s in region)
    count = math.prod(size)
    bits = decompress(payload, codec, (count + 7) // 8)
    flat = np.unpackbits(np.frombuffer(bits, np.uint8), count=count).view(bool)
    mask = flat.reshape(size[::-1]).T if order == "F" else flat.reshape(size)
    if int(np.count_nonzero(mask)) != voxels:
        raise WireError(f"result mask holds {np.count_nonzero(mask)} voxels, header says {voxels}")
    return Result(
        region,
        mask,
        shape,
        crops,  # type: ignore[arg-type]
        None if iou is None else float(iou),
        limit,
    )
