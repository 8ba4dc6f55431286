"""The remote wire format (torch-free): volume chunks, bounded decompression, result masks."""

from __future__ import annotations

import base64
import subprocess
import sys
import zlib

import numpy as np
import pytest

from fastsam3d import wire
from fastsam3d.result import Result


def _upload(array: np.ndarray, codec: str, chunk: int, max_bytes: int = 2**30) -> np.ndarray:
    a = wire.wire_array(array)
    asm = wire.VolumeAssembler(wire.volume_header(a, np.eye(4), codec, chunk), max_bytes)
    chunks = list(wire.volume_chunks(a, codec, chunk))
    assert len(chunks) == asm.chunks
    for n, c in reversed(list(enumerate(chunks))):  # any order
        asm.add(n, c)
    return asm.array()


@pytest.mark.parametrize("codec", wire.available_codecs())
@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", ">f8", "|u1", "bool"])
def test_volume_round_trip_in_chunks(codec: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(33, 40, 50)) * 100).astype(dtype)
    out = _upload(a, codec, wire.MIN_CHUNK_BYTES)
    assert out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, a.astype(np.uint8) if dtype == "bool" else a)


def test_bad_headers_are_named() -> None:
    a = np.zeros((4, 5, 6), np.float32)
    good = wire.volume_header(a, np.eye(4), "zlib", wire.MIN_CHUNK_BYTES)
    for change, words in [
        ({"shape": [4, 5]}, "three integers"),
        ({"shape": [4, 5, 0]}, "positive"),
        ({"shape": [4.0, 5, 6]}, "three integers"),
        ({"dtype": "<c8"}, "dtype"),
        ({"dtype": "O"}, "dtype"),
        ({"codec": "lzma"}, "codec"),
        ({"chunk_bytes": 10}, "chunk_bytes"),
    ]:
        with pytest.raises(wire.WireError, match=words):
            wire.VolumeAssembler({**good, **change}, 2**30)
    with pytest.raises(OverflowError, match="exceeds the server's upload limit of 1 MB"):
        wire.VolumeAssembler({**good, "shape": [512, 512, 300]}, 2**20)


def test_decompression_is_capped_and_chunks_are_checked() -> None:
    a = np.zeros((64, 64, 64), np.float32)  # 1 MiB of zeros: compresses ~1000x
    asm = wire.VolumeAssembler(wire.volume_header(a, np.eye(4), "zlib", 2**19), 2**30)
    assert asm.chunks == 2
    bomb = zlib.compress(bytes(2**22))  # 4 MiB for a 512 KiB chunk
    with pytest.raises(wire.WireError, match="beyond the declared"):
        asm.add(0, bomb)
    with pytest.raises(wire.WireError, match="expected 524288"):
        asm.add(0, zlib.compress(bytes(100)))
    with pytest.raises(wire.WireError, match="cannot decompress"):
        asm.add(0, b"not compressed at all")
    with pytest.raises(wire.WireError, match="out of range"):
        asm.add(2, zlib.compress(bytes(2**19)))
    asm.add(1, zlib.compress(bytes(2**19)))
    with pytest.raises(wire.WireError, match=r"chunk\(s\) \[0\] of 2 not received"):
        asm.array()
    if "zstd" in wire.available_codecs():
        with pytest.raises(wire.WireError):
            wire.decompress(wire.compress(bytes(2**20), "zstd"), "zstd", 2**10)


def test_result_round_trip_and_checks() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((7, 9, 13)) > 0.6
    r = Result((slice(3, 10), slice(0, 9), slice(20, 33)), mask, (12, 9, 40), 2, 0.75, True)
    for codec in wire.available_codecs():
        back = wire.decode_result(wire.encode_result(r, codec))
        assert back.region == r.region and back.shape == r.shape
        assert (back.crops, back.iou, back.at_crop_limit) == (2, 0.75, True)
        np.testing.assert_array_equal(back.mask, mask)
    # a Fortran-ordered mask (as the session's paste often returns) travels in its own order,
    # without a transposing copy, and arrives equal (and Fortran-ordered again)
    f = Result(r.region, np.asfortranarray(mask), r.shape)
    d = wire.encode_result(f, "zlib")
    assert d["mask"]["order"] == "F"
    back = wire.decode_result(d)
    np.testing.assert_array_equal(back.mask, mask)
    assert back.mask.flags.f_contiguous
    assert wire.encode_result(r, "zlib")["mask"]["order"] == "C"
    with pytest.raises(wire.WireError, match="order"):
        wire.decode_result({**d, "mask": {**d["mask"], "order": "K"}})
    empty = Result((slice(0, 0),) * 3, np.zeros((0, 0, 0), bool), (4, 4, 4))
    assert wire.decode_result(wire.encode_result(empty, "zlib")).mask.shape == (0, 0, 0)
    d = wire.encode_result(r, "zlib")
    with pytest.raises(wire.WireError, match="outside the volume"):
        wire.decode_result({**d, "region": [[3, 10], [0, 9], [20, 41]]})
    with pytest.raises(wire.WireError, match="voxels, header says"):
        wire.decode_result({**d, "mask": {**d["mask"], "voxels": 1}})
    bits = base64.b64encode(zlib.compress(bytes(5))).decode()
    with pytest.raises(wire.WireError, match="expands to 5 bytes"):
        wire.decode_result({**d, "mask": {**d["mask"], "data": bits}})
    with pytest.raises(wire.WireError, match="malformed result"):
        wire.decode_result({"region": [[0, 1]]})


def test_client_side_imports_without_torch() -> None:
    """RemoteSession, Result and the wire format must work where torch is absent (Slicer)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import fastsam3d\n"
        "from fastsam3d import RemoteSession, Result, SessionError, VolumeError, "
        "paste_result, Volume\n"
        "from fastsam3d.remote import check_server\n"
        "import fastsam3d.wire\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
