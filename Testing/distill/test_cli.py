"""The console command end to end (in-process): synth -> cache -> distill --cache -> export,
and the GPU benchmark's CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from distill_helpers import REPO, STUDENT_OVERRIDES, TEACHER, TEACHER_OVERRIDES, subprocess_env

import fastsam3d
from fastsam3d_distill.cli import main
from fastsam3d_distill.models import config_from_dict
from fastsam3d_distill.state import load_training_checkpoint

TINY = [
    "--teacher",
    TEACHER,
    "--teacher-override",
    *TEACHER_OVERRIDES,
    "--student-override",
    *STUDENT_OVERRIDES,
]


def test_cache_then_distill_from_cache_then_export(tmp_path):
    data, feats, run = tmp_path / "data", tmp_path / "feats", tmp_path / "run"
    assert (
        main(
            [
                "synth",
                "--out",
                str(data),
                "--cases",
                "2",
                "--shape",
                "32",
                "36",
                "40",
                "--oblique",
                "10",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "cache",
                *TINY,
                "--data",
                str(data),
                "--min-voxels",
                "20",
                "--out",
                str(feats),
                "--device",
                "cpu",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    index = json.loads((feats / "index.json").read_text(encoding="utf-8"))
    assert index["teacher_depth"] == 4 and index["n"] >= 4
    assert (
        main(
            [
                "distill",
                *TINY,
                "--cache",
                str(feats),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--precision",
                "fp32",
                "--device",
                "cpu",
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    ckpt = load_training_checkpoint(run / "final.pt")
    assert ckpt["task"] == "distill" and ckpt["progress"]["opt_step"] == index["n"] // 2
    # The exported student (tiny, so its config is passed explicitly) holds the trained encoder.
    cfg = config_from_dict(json.loads(ckpt["meta"])["student_config"])
    student = fastsam3d.load_model(str(run / "student.pth"), config=cfg)
    for k, v in ckpt["model"].items():
        assert torch.equal(student.state_dict()["image_encoder." + k[len("student.") :]], v)
    out = tmp_path / "again.pth"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run / "last.pt"),
                "--base",
                TEACHER,
                "--base-override",
                *TEACHER_OVERRIDES,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    again = fastsam3d.load_model(str(out.with_suffix(".safetensors")), config=cfg)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in student.state_dict().items())


def test_gpu_benchmark_smoke_mode_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "distill/benchmarks/gpu_distill.py"),
            "--smoke",
            "--minutes",
            "0.1",
            "--out",
            str(tmp_path),
        ],
        env=subprocess_env(),
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    res = json.loads((tmp_path / "gpu_distill.json").read_text(encoding="utf-8"))
    for phase in ("online", "cached"):
        assert res[phase]["micro_steps"] > 0 and res[phase]["loss_curve"]
    assert res["cache"]["volumes"] == res["crops"] >= 4
    g = res["gating"]
    assert g["baseline"]["micro_steps"] > 0 and g["gated"]["micro_steps"] > 0
    assert (tmp_path / "gpu_distill.png").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    """Review m2: every error was a ~23-line traceback."""
    assert main(["distill", "--out", str(tmp_path / "r"), "--synthetic", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fastsam3d-distill distill: error: give --teacher (a SAM-Med3D-turbo "
        "checkpoint) or --preset tiny"
    ]
    assert (
        main(
            [
                "evaluate",
                "--model",
                "x.pth",
                "--data",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a dataset folder nor a list file" in err[0]


def test_preset_tiny_smoke_run_with_the_released_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "distill",
                "--preset",
                "tiny",
                "--synthetic",
                "2",
                "--out",
                str(run),
                "--max-steps",
                "1",
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "recipe released: loss=neck, init=random, grad_clip=0.0" in out
    ckpt = load_training_checkpoint(run / "final.pt")
    assert json.loads(ckpt["config"])["batch_size"] == 1  # CPU default
    assert json.loads(ckpt["meta"])["loss"] == "neck"
    assert (run / "student.pth").exists()


def test_every_synth_and_evaluate_option_has_help():
    """newcomer p2: synth and evaluate options had no help text, the top help showed RST."""
    from fastsam3d_distill.cli import build_parser

    ap = build_parser()
    assert "``" not in ap.description
    sub = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("synth", "evaluate"):
        for action in sub.choices[name]._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_errors_share_one_root_and_one_mapping(tmp_path, capsys, monkeypatch):
    """Style review 4: DistillError derives from fastsam3d's root; main alone maps errors."""
    import fastsam3d_distill
    from fastsam3d_distill.commands import export as export_command

    assert issubclass(fastsam3d_distill.DistillError, fastsam3d.FastSAM3DError)
    assert issubclass(fastsam3d_distill.DistillUsageError, ValueError)
    argv = ["export", "--checkpoint", "c.pt", "--base", "b.pth", "--out", str(tmp_path / "o")]
    for exc, code, text in (
        (KeyboardInterrupt(), 130, "interrupted"),
        (fastsam3d.CheckpointError("not a checkpoint"), 2, "error: not a checkpoint"),
    ):

        def boom(args, exc=exc):
            raise exc

        monkeypatch.setattr(export_command, "run", boom)
        assert main(argv) == code
        assert capsys.readouterr().err.strip() == f"fastsam3d-distill export: {text}"


def test_teacher_config_is_detected_from_the_file(tmp_path, capsys):
    """Review m3: a teacher file of another size needed a config name and failed with a shape
    report; now its network is detected (FastSAM3D block) and an unreadable one is one line."""
    from argparse import Namespace

    from distill_helpers import TINY_TEACHER

    from fastsam3d.testing import fixture_model
    from fastsam3d_distill.models import load_spec
    from fastsam3d_distill.stage1 import teacher_identity

    ref = fixture_model("sam-med3d-turbo-fastsam3d-block", **TINY_TEACHER)
    path = tmp_path / "tiny_teacher.pth"
    torch.save({"model_state_dict": ref.state_dict()}, path)
    got = load_spec(str(path), config="detect")
    assert got.config.block_style == "fastsam3d"
    assert (got.config.depth, got.config.embed_dim) == (4, 32)
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.no_grad():
        assert torch.equal(got.image_encoder(x), ref.image_encoder(x))
    ident = teacher_identity(Namespace(teacher=str(path), teacher_config="detect"))
    assert ident["config"] == got.config.name
    common = ["--student-override", *STUDENT_OVERRIDES, "--synthetic", "2", "--max-steps", "1"]
    common += ["--device", "cpu", "--precision", "fp32", "--no-progress", "--no-tensorboard"]
    assert main(["distill", "--teacher", str(path), "--out", str(tmp_path / "r"), *common]) == 0
    bad = tmp_path / "bad.pth"
    torch.save({"model_state_dict": {"x": torch.zeros(2)}}, bad)
    assert main(["distill", "--teacher", str(bad), "--out", str(tmp_path / "b"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher-config detect: cannot tell which network" in err[0]
