"""The torch-free checkpoint reader: same tensors as torch.load, and it refuses every crafted
pickle the torch-based loader (fastsam3d.checkpoint.read_checkpoint) refuses."""

from __future__ import annotations

import argparse
import builtins
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from fastsam3d.checkpoint import CheckpointError, read_checkpoint, save_official, save_safetensors
from fastsam3d.pth_reader import CheckpointReadError, read_pth, read_safetensors, read_weights
from fastsam3d.testing import fixture_model

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3, "num_attn_free_blocks": 1}


def test_official_container_reads_exactly(tmp_path):
    model = fixture_model("fastsam3d", **TINY)
    path = save_official(model, tmp_path / "m.pth", epoch=3)
    obj = read_pth(path)
    sd = model.state_dict()
    assert list(obj["model_state_dict"]) == list(sd)
    for k, v in sd.items():
        got = obj["model_state_dict"][k]
        assert got.dtype == np.float32 and got.shape == tuple(v.shape)
        assert np.array_equal(got, v.numpy()), k
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].epoch == 3
    assert obj["args"].block_style == "fastsam3d"


def test_dtypes_views_shared_storage_and_parameters(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    data = {
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(-3, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),  # non-contiguous view
        "slice": base[1:, 2:5],  # offset into a shared storage
        "whole": base,
        "param": torch.nn.Parameter(torch.ones(3)),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "nested": [{"x": torch.ones(2)}, (1, "a", 2.0, None)],
    }
    path = tmp_path / "d.pth"
    torch.save(data, path)
    got = read_pth(path)
    for k in ("f16", "f64", "i64", "u8", "bool", "transposed", "slice", "whole", "empty", "scalar"):
        assert got[k].shape == tuple(data[k].shape), k
        assert np.array_equal(got[k], data[k].numpy()), k
    assert np.array_equal(got["bf16"], data["bf16"].float().numpy())
    assert np.array_equal(got["param"], np.ones(3, np.float32))
    assert np.array_equal(got["nested"][0]["x"], np.ones(2, np.float32))
    assert got["nested"][1] == (1, "a", 2.0, None)


def test_safetensors_without_the_package(tmp_path):
    model = fixture_model("fastsam3d", **TINY)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    got = read_weights(path)
    assert got["__metadata__"]["block_style"] == "fastsam3d"
    for k, v in model.state_dict().items():
        assert np.array_equal(got[k], v.numpy()), k
    from safetensors.torch import save_file

    save_file({"b": torch.randn(3, 2).to(torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    b = read_safetensors(tmp_path / "b.safetensors")["b"]
    assert b.dtype == np.float32 and b.shape == (3, 2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointReadError, match="header length"):
        read_safetensors(bad)


# --- crafted files: both loaders must refuse each, and nothing may run --------------------
class _System:
    def __reduce__(self):
        return (os.system, (f"touch {MARK[0]}",))


class _Eval:
    def __reduce__(self):
        return (builtins.eval, (f"open({str(MARK[0])!r}, 'w')",))


class _Exec:
    def __reduce__(self):
        return (builtins.exec, (f"open({str(MARK[0])!r}, 'w').close()",))


class _NumpyObject:
    """numpy's reconstructor is a global neither loader admits."""

    def __reduce__(self):
        return np.array([1], dtype=object).__reduce__()


class _Import:
    def __reduce__(self):
        return (builtins.__import__, ("os",))


class _Ordered(collections.OrderedDict):
    """A subclass smuggled under an allowed-looking container."""


MARK: list = [None]
PAYLOADS = {
    "os.system": _System,
    "eval": _Eval,
    "exec": _Exec,
    "numpy reconstruct": _NumpyObject,
    "__import__": _Import,
}


def _crafted(tmp_path, name: str, zip_format: bool):
    payload = PAYLOADS[name]()
    obj = {"model_state_dict": {"x": torch.zeros(1)}, "payload": payload}
    path = tmp_path / f"{name.replace(' ', '_')}_{int(zip_format)}.pth"
    if zip_format:
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_crafted_pickles_are_refused_by_both_loaders(tmp_path, name, zip_format):
    MARK[0] = tmp_path / "pwned"
    path = _crafted(tmp_path, name, zip_format)
    with pytest.raises(CheckpointError, match="refused|cannot read"):
        read_checkpoint(path)
    with pytest.raises(CheckpointReadError, match="refused" if zip_format else "not a PyTorch"):
        read_pth(path)
    assert not MARK[0].exists(), "unpickling ran code"


def test_subclass_globals_and_bad_geometry_are_refused(tmp_path):
    path = tmp_path / "sub.pth"
    torch.save({"model_state_dict": _Ordered(x=torch.zeros(1))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    with pytest.raises(CheckpointReadError, match="refused"):
        read_pth(path)
    # a tensor whose strides reach past its storage (would read foreign memory)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    with zipfile.ZipFile(good) as zf:
        names = zf.namelist()
        blobs = {n: zf.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    data = blobs[pkl]
    # size (4,) -> (400,) : same pickle, one integer changed (BININT1 4 -> BININT2 400)
    patched = data.replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
    assert patched != data
    blobs[pkl] = patched
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w") as zf:
        for n in names:
            zf.writestr(n, blobs[n])
    with pytest.raises(CheckpointReadError, match="reaches element"):
        read_pth(bad)


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointReadError, match="not found"):
        read_pth(tmp_path / "none.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match="not a PyTorch zip"):
        read_pth(junk)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(CheckpointReadError, match="not a state dict"):
        read_weights(lst)
