"""Read PyTorch checkpoints (.pth, zip format) and safetensors files into numpy, without torch.

For the torch-free engine (``pip install fastsam3d[onnx]``): the official FastSAM3D /
SAM-Med3D weights are ``torch.save`` zip archives whose ``data.pkl`` names tensor storages.
This reader runs the pickle through an unpickler that admits exactly what
:func:`fastsam3d.checkpoint.read_checkpoint` admits (PyTorch's ``weights_only`` allowlist for
plain containers and tensors, plus ``argparse.Namespace``) and nothing else: any other global
(``os.system``, ``builtins.eval``, numpy reconstructors, arbitrary classes) raises
:class:`CheckpointReadError` before it could be called. Tensors become numpy arrays (bf16 is
widened to float32); their offsets and strides are checked against the storage's size.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FastSAM3DError

__all__ = ["CheckpointReadError", "read_pth", "read_safetensors", "read_weights", "ALLOWED"]

# numpy dtype of each storage class torch.save writes ("bfloat16" is read as uint16, widened)
_STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_SAFETENSORS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class CheckpointReadError(FastSAM3DError, RuntimeError):
    """A file that is not a readable checkpoint, or that holds more than tensors and plain
    containers (refused without running any of it)."""


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Storage:
    """A tensor storage read from the archive (bytes + dtype); never built by the pickle."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError("a storage cannot be given state")


class _Tensor:
    """A rebuilt tensor; turned into a numpy array once the pickle is fully read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError("a tensor cannot be given state")


def _widen_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor must be built on a storage of the archive")
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise pickle.UnpicklingError(
            f"invalid tensor geometry size={size} stride={stride} offset={offset}"
        )
    data = storage.data
    if 0 in size:
        return _Tensor(np.zeros(size, dtype=data.dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise pickle.UnpicklingError(f"tensor reaches element {last} of a storage of {data.size}")
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=[s * data.itemsize for s in stride]
    )
    return _Tensor(np.array(view))  # a copy: nothing aliases the archive's buffer


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None
) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return data


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin1 byte strings may be encoded")
    return codecs.encode(text, encoding)


# (module, name) -> what the unpickler gets. The same set read_checkpoint's torch.load admits
# for plain containers (weights_only) plus argparse.Namespace, as stand-ins without torch.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
    ("argparse", "Namespace"): argparse.Namespace,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, byteorder: str) -> None:
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._order = zf, prefix, byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        try:
            raw = self._zf.read(name)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} missing from the archive") from None
        bf16 = stype.dtype == "bfloat16"
        dt = np.dtype("uint16" if bf16 else stype.dtype)
        if self._order == "big":
            dt = dt.newbyteorder(">")
        if len(raw) != numel * dt.itemsize:
            raise pickle.UnpicklingError(
                f"storage {key}: {len(raw)} bytes for {numel} elements of {dt}"
            )
        arr = np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="))
        storage = _Storage(_widen_bf16(arr) if bf16 else arr)
        self._storages[key] = storage
        return storage


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        return obj.array
    if isinstance(obj, dict):
        return type(obj)((k, _unwrap(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _unwrap(v) for k, v in vars(obj).items()})
    if isinstance(obj, (_Storage, _StorageType)):
        raise CheckpointReadError("the pickle holds a bare storage, not a tensor")
    return obj


def read_pth(path: str | os.PathLike[str]) -> Any:
    """The object a ``torch.save`` zip archive holds, with tensors as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointReadError(
            f"{path} is not a PyTorch zip archive (a legacy pre-1.6 file or a bare pickle); "
            "without PyTorch only the zip format and safetensors can be read: convert it with "
            "`fastsam3d convert` where PyTorch is installed"
        )
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointReadError(
                f"{path}: expected one data.pkl in the archive, found {len(pkls)}"
            )
        prefix = pkls[0][: -len("data.pkl")]
        order = "little"
        if f"{prefix}byteorder" in zf.namelist():
            order = zf.read(f"{prefix}byteorder").decode().strip()
            if order not in ("little", "big"):
                raise CheckpointReadError(f"{path}: unknown byte order {order!r}")
        try:
            obj = _Unpickler(zf.read(pkls[0]), zf, prefix, order).load()
        except pickle.UnpicklingError as exc:
            raise CheckpointReadError(
                f"refused to load {path}: it holds pickled objects other than tensors and "
                f"argparse.Namespace, which could run code when unpickled. ({exc})"
            ) from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error) as exc:
            raise CheckpointReadError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    return _unwrap(obj)


def read_safetensors(path: str | os.PathLike[str]) -> dict:
    """Tensors of a safetensors file as numpy arrays, plus ``"__metadata__"`` (no pickle at
    all; parsed here so that the safetensors package is not needed either)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointReadError(f"{path} is too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointReadError(f"{path}: header length {n} exceeds the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise CheckpointReadError(f"{path}: bad safetensors header ({exc})") from None
    base = 8 + n
    out: dict[str, Any] = {"__metadata__": dict(header.pop("__metadata__", None) or {})}
    for name, info in header.items():
        dtype = _SAFETENSORS.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointReadError(f"{path}: {name} has unsupported dtype {info.get('dtype')}")
        start, stop = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        dt = np.dtype("<u2" if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<"))
        if not (0 <= start <= stop <= len(data) - base) or stop - start != (
            int(np.prod(shape)) * dt.itemsize
        ):
            raise CheckpointReadError(f"{path}: {name} has inconsistent offsets")
        arr = np.frombuffer(
            data, dtype=dt, count=(stop - start) // dt.itemsize, offset=base + start
        ).reshape(shape)
        arr = _widen_bf16(arr) if dtype == "bfloat16" else arr.astype(dt.newbyteorder("="))
        out[name] = arr
    return out


def read_weights(path: str | os.PathLike[str]) -> dict:
    """A checkpoint file (.safetensors, or a PyTorch zip archive) as a plain dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pth(path)
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)
