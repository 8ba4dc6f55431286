"""Export: a distilled student loads in fastsam3d and segments exactly like the trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_helpers import TINY_STUDENT, TINY_TEACHER

import fastsam3d
from fastsam3d.testing import fixture_model
from fastsam3d_distill.data import TensorCropDataset
from fastsam3d_distill.engine import TrainConfig, Trainer
from fastsam3d_distill.export import export_model, model_from_training_checkpoint
from fastsam3d_distill.stage1 import DistillTask, init_student_from_teacher
from fastsam3d_distill.synthetic import make_phantom

# fastsam3d.load_model detects the config from the weights with the real 384-wide decoder.
STUDENT = {**TINY_STUDENT, "out_chans": 384}
TEACHER = {**TINY_TEACHER, "out_chans": 384}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, crops):
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    teacher = fixture_model("sam-med3d-turbo-fastsam3d-block", **TEACHER)
    student = fastsam3d.build_model("fastsam3d", **STUDENT).image_encoder.train()
    init_student_from_teacher(student, teacher.image_encoder)
    s_cfg = fastsam3d.get_config("fastsam3d", **STUDENT)
    task = DistillTask(student, teacher.image_encoder, loss="neck", student_config=s_cfg)
    cfg = TrainConfig(
        out_dir=str(tmp / "run"),
        epochs=1,
        batch_size=1,
        precision="fp32",
        device="cpu",
        resume=False,
        tensorboard=False,
        progress=False,
    )
    Trainer(task, TensorCropDataset(crops[0][:1]), cfg).fit()
    model = model_from_training_checkpoint(tmp / "run" / "final.pt", teacher)
    paths = export_model(model, tmp / "student.pth")
    return model, paths, teacher


def test_export_writes_official_container_and_safetensors(exported):
    model, paths, teacher = exported
    pth, st = paths
    assert pth.suffix == ".pth" and st.suffix == ".safetensors"
    raw = torch.load(pth, map_location="cpu", weights_only=False)
    assert set(raw) == {"model_state_dict", "args"}
    keys = raw["model_state_dict"].keys()
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in keys)
    # The student keeps the teacher's decoder (FastSAM3D pairs them until fine-tuning).
    for k, v in teacher.mask_decoder.state_dict().items():
        assert torch.equal(raw["model_state_dict"][f"mask_decoder.{k}"], v)


def test_exported_files_load_in_fastsam3d_with_identical_weights(exported):
    model, paths, _ = exported
    ref = model.state_dict()
    for path in paths:
        loaded = fastsam3d.load_model(str(path))
        assert loaded.config.depth == STUDENT["depth"]
        assert loaded.config.num_attn_free_blocks == STUDENT["num_attn_free_blocks"]
        got = loaded.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_exported_model_segments_like_the_trained_one(exported):
    model, paths, _ = exported
    ph = make_phantom(shape=(48, 56, 64), seed=3, oblique_deg=10)
    vol = fastsam3d.Volume(ph.image, ph.affine)
    k, j, i = np.argwhere(ph.label == 1).mean(0)
    ras = ph.affine[:3, :3] @ np.array([i, j, k]) + ph.affine[:3, 3]
    masks = []
    for m in (model, str(paths[0])):
        s = fastsam3d.Session(m, device="cpu", warmup=False)
        s.set_volume(vol)
        r = s.add_point(ras, positive=True)
        masks.append(r.full_mask())
    assert masks[0].shape == ph.image.shape
    assert np.array_equal(masks[0], masks[1])


def test_wrong_files_get_clear_messages(tmp_path):
    """Review m2: `evaluate --model last.pt` blamed the encoder blocks; `export --checkpoint
    model.pth` raised torch's UnpicklingError."""
    import argparse

    from fastsam3d_distill.models import load_spec
    from fastsam3d_distill.state import CKPT_FORMAT, atomic_save, load_training_checkpoint

    last = tmp_path / "last.pt"
    atomic_save({"format": CKPT_FORMAT, "model": {}}, last)
    with pytest.raises(ValueError, match="training checkpoint, not a model: run"):
        load_spec(str(last))
    exported = tmp_path / "model.pth"
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(a=1)}, exported)
    with pytest.raises(ValueError, match="not a fastsam3d-distill training checkpoint"):
        load_training_checkpoint(exported)
