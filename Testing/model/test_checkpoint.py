"""Every checkpoint container form, config detection, mismatches, and refusing code in pickles."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import torch

import fastsam3d
from fastsam3d.checkpoint import (
    CheckpointError,
    detect_config,
    extract_state_dict,
    load_model,
    read_checkpoint,
    save_official,
    save_safetensors,
)
from fastsam3d.testing import apply_recipe

# Tiny networks keep this suite fast; the container logic does not depend on size.
TINY = dict(embed_dim=48, num_heads=3, out_chans=384)


def tiny(name: str) -> fastsam3d.modeling.Sam3D:
    return apply_recipe(fastsam3d.build_model(name, **TINY))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def student():
    return tiny("fastsam3d")


def test_full_model_container_with_namespace_args(tmp_path, student):
    # The official layout: prefixed keys plus pickled training metadata.
    path = tmp_path / "FastSAM3D.pth"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": student.state_dict(),
            "args": argparse.Namespace(model_type="vit_b_ori", lr=8e-4),
            "losses": [0.5, 0.4],
        },
        path,
    )
    model = load_model(path, config=fastsam3d.get_config("fastsam3d", **TINY))
    assert same_weights(model, student)
    assert not model.training


def test_detects_configs_from_keys_and_shapes():
    for name in ("fastsam3d", "sam-med3d-turbo"):
        sd = fastsam3d.build_model(name).state_dict()
        assert detect_config(sd).name == name
    custom = detect_config(tiny("fastsam3d").state_dict())
    assert custom.depth == 6 and custom.num_attn_free_blocks == 2 and custom.embed_dim == 48


def test_encoder_only_file_merged_with_decoder_file(tmp_path, student):
    enc = {
        k[len("image_encoder.") :]: v
        for k, v in student.state_dict().items()
        if k.startswith("image_encoder.")
    }
    enc_path, dec_path = tmp_path / "6layers6heads_student.pth", tmp_path / "full.pth"
    torch.save({"model_state_dict": enc, "args": argparse.Namespace(depth=6)}, enc_path)
    other = tiny("fastsam3d")
    torch.save({"model_state_dict": other.state_dict()}, dec_path)
    model = load_model(enc_path, decoder=dec_path)
    assert same_weights(model, other)  # same recipe, so identical; the merge picked all keys
    with pytest.raises(CheckpointError, match="only an image encoder"):
        load_model(enc_path)


def test_raw_state_dict_and_ddp_prefix(tmp_path, student):
    raw = tmp_path / "raw.pt"
    torch.save({f"module.{k}": v for k, v in student.state_dict().items()}, raw)
    assert same_weights(load_model(raw), student)


def test_safetensors_round_trip_keeps_block_style(tmp_path):
    teacher = tiny("sam-med3d-turbo-fastsam3d-block")
    path = save_safetensors(teacher, tmp_path / "teacher.safetensors")
    model = load_model(path)
    assert model.config.block_style == "fastsam3d"
    assert same_weights(model, teacher)


def test_save_official_is_loadable_and_atomic(tmp_path, student, monkeypatch):
    path = save_official(student, tmp_path / "out.pth", epoch=1)
    obj = read_checkpoint(path)
    assert isinstance(obj["args"], argparse.Namespace)
    assert same_weights(load_model(path), student)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_official(student, path)
    assert path.read_bytes() == before, "a failed save must not touch the existing file"
    assert sorted(os.listdir(tmp_path)) == ["out.pth"], "no temporary file left behind"


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path, student):
    sd = dict(student.state_dict())
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.extra.weight"] = torch.zeros(1)
    sd["image_encoder.neck.1.weight"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "mask_decoder.iou_token.weight" in msg
    assert "unexpected keys (1)" in msg and "image_encoder.extra.weight" in msg
    assert "wrong shapes (1)" in msg and "image_encoder.neck.1.weight" in msg


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model_state_dict": {}, "payload": _Exploit()}, f)
    torch.save(
        {"model_state_dict": {"x": torch.zeros(1)}, "payload": _Exploit()},
        tmp_path / "evil_zip.pth",
    )
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            load_model(p)
    assert not marker.exists(), "unpickling ran code"


def test_unknown_name_and_missing_file_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="neither a file nor a registered weights name"):
        load_model("no-such-model")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_extract_rejects_tensorless_files():
    with pytest.raises(CheckpointError, match="no tensors"):
        extract_state_dict({"args": argparse.Namespace()})


def test_registered_name_goes_through_the_verified_cache(tmp_path, monkeypatch, student):
    """A registry name resolves through the hub (here a file:// URL) and loads."""
    from fastsam3d import weights

    src = tmp_path / "src" / "FastSAM3D.pth"
    src.parent.mkdir()
    save_official(student, src)
    monkeypatch.setenv("FASTSAM3D_CACHE", str(tmp_path / "cache"))
    info = weights.get_weights("fastsam3d")
    monkeypatch.setitem(
        weights.WEIGHTS,
        "fastsam3d",
        dataclasses.replace(info, url=Path(src).as_uri(), config="fastsam3d"),
    )
    model = load_model("fastsam3d", config=student.config)
    assert same_weights(model, student)
