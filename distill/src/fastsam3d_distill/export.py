"""Export: training checkpoints -> the official container and safetensors.

The files are written by ``fastsam3d.checkpoint`` (``save_official``, ``save_safetensors``), so
they are exactly what ``fastsam3d.load_model``, the Slicer module and the public FastSAM3D /
SAM-Med3D code read. A distilled student has no decoder of its own: like FastSAM3D, it is
paired with the teacher's prompt encoder + mask decoder until stage 2 fine-tunes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import config_from_dict, load_spec
from .state import load_training_checkpoint


def assemble_student(student_encoder: nn.Module, student_config: Any, base: nn.Module) -> nn.Module:
    """A full Sam3D: the student encoder + ``base``'s prompt encoder and mask decoder."""
    import fastsam3d

    model = fastsam3d.build_model(student_config)
    model.image_encoder.load_state_dict(student_encoder.state_dict(), strict=True)
    try:
        model.prompt_encoder.load_state_dict(base.prompt_encoder.state_dict(), strict=True)
        model.mask_decoder.load_state_dict(base.mask_decoder.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(
            "the teacher's prompt encoder / mask decoder do not fit the student config "
            f"(out_chans {student_config.out_chans}?): {e}"
        ) from e
    return model.eval()


def model_from_training_checkpoint(ckpt_path: str | Path, base_spec: str | nn.Module) -> nn.Module:
    """Rebuild a full model from a ``distill`` or ``finetune`` training checkpoint.

    ``base_spec`` supplies what the checkpoint does not hold: the teacher (for its prompt
    encoder + decoder) after ``distill``, the fine-tuned model's source (for its frozen
    encoder) after ``finetune``.
    """
    ckpt = load_training_checkpoint(ckpt_path)
    meta = json.loads(ckpt.get("meta", "{}"))
    sd = ckpt["model"]
    base = load_spec(base_spec) if isinstance(base_spec, str) else base_spec
    if ckpt["task"] == "distill":
        cfg = config_from_dict(meta["student_config"])
        import fastsam3d

        enc = fastsam3d.build_model(cfg).image_encoder
        enc.load_state_dict({k[len("student.") :]: v for k, v in sd.items()}, strict=True)
        return assemble_student(enc, cfg, base)
    if ckpt["task"] == "finetune":
        cfg = config_from_dict(meta["model_config"]) if meta.get("model_config") else base.config
        import fastsam3d

        model = fastsam3d.build_model(cfg)
        model.image_encoder.load_state_dict(base.image_encoder.state_dict(), strict=True)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("image_encoder.") for k in missing):
            raise ValueError(
                f"{ckpt_path}: unexpected {unexpected}, missing "
                f"{[k for k in missing if not k.startswith('image_encoder.')]}"
            )
        return model.eval()
    raise ValueError(f"{ckpt_path}: unknown stage {ckpt['task']!r}")


def export_model(
    model: nn.Module, out_path: str | Path, safetensors: bool = True, **metadata: str
) -> list[Path]:
    """Write ``out_path`` (official ``{"model_state_dict", "args"}`` container) and, unless
    disabled, the same weights as ``.safetensors`` beside it. Refuses to overwrite nothing
    silently: both writes are atomic replacements."""
    from fastsam3d import checkpoint

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu")
    written = [
        checkpoint.save_official(model, out_path, exported_by="fastsam3d-distill", **metadata)
    ]
    if safetensors:
        st = out_path.with_suffix(".safetensors")
        written.append(
            checkpoint.save_safetensors(
                model, st, metadata={"exported_by": "fastsam3d-distill", **metadata}
            )
        )
    return written


@torch.no_grad()
def parameters_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
