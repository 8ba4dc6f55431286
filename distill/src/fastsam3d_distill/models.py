"""Model specs for the CLI and checkpoints: registry names, checkpoint paths, fixture weights,
config overrides. All networks come from fastsam3d."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(d: dict[str, Any]) -> Any:
    from fastsam3d.build import ModelConfig

    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return ModelConfig(**kw)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["depth=2", "embed_dim=32", "global_attn_indexes=1,3"]`` -> typed config overrides."""
    from fastsam3d.build import ModelConfig

    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, val = item.split("=", 1)
        if key not in types:
            raise ValueError(f"unknown config field {key!r}; fields: {', '.join(sorted(types))}")
        t = str(types[key])
        if "tuple" in t:
            out[key] = tuple(int(v) for v in val.split(",") if v.strip())
        elif "float" in t:
            out[key] = float(val)
        elif "int" in t:
            out[key] = int(val)
        else:
            out[key] = val
    return out


DETECT = "detect"


def detect_teacher_config(path: str | Path) -> Any:
    """The teacher network a checkpoint file holds (a ``fastsam3d`` ``ModelConfig``), from its
    keys and shapes by fastsam3d's own detection. Weights cannot show the block style: the
    file's recorded style is used, else FastSAM3D's (its teacher ran the SAM-Med3D-turbo
    weights with the FastSAM3D block), so the official file resolves to
    ``sam-med3d-turbo-fastsam3d-block`` and a smaller teacher to a ``custom(...)`` config.
    """
    from fastsam3d.checkpoint import detect_config, load_state_dict_file
    from fastsam3d.configs import MODEL_CONFIGS

    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found")
    try:
        sd, style = load_state_dict_file(path)
        cfg = detect_config(sd)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise ValueError(
            f"--teacher-config detect: cannot tell which network {path} holds ({first}); "
            "name its config with --teacher-config (e.g. sam-med3d-turbo-fastsam3d-block)"
        ) from None
    style = style or "fastsam3d"
    if style != cfg.block_style:
        named = MODEL_CONFIGS.get(f"{cfg.name}-fastsam3d-block") if style == "fastsam3d" else None
        cfg = named or dataclasses.replace(cfg, block_style=style)
    return cfg


def load_spec(
    spec: str, device: str | torch.device = "cpu", config: Any = None, **overrides: Any
) -> nn.Module:
    """A full Sam3D from a spec.

    ``fixture:NAME`` = registry config with the parity-recipe weights (no download; for tests
    and GPU benchmarks), ``random:NAME`` = random init, otherwise a checkpoint path or hub
    name for ``fastsam3d.load_model`` (``config`` overrides its detection, e.g. to run SAM-Med3D
    weights with FastSAM3D's block; ``"detect"``: :func:`detect_teacher_config`). Overrides
    apply to fixture/random specs only.
    """
    import fastsam3d

    if spec.startswith("fixture:"):
        from fastsam3d.testing import fixture_model

        return fixture_model(spec.split(":", 1)[1], device=device, **overrides)
    if spec.startswith("random:"):
        return fastsam3d.build_model(spec.split(":", 1)[1], **overrides).to(device)
    if overrides:
        raise ValueError(f"config overrides apply to fixture:/random: specs, not to {spec!r}")
    if Path(spec).exists() or not spec.endswith((".pth", ".pt", ".safetensors")):
        if config == DETECT:
            config = detect_teacher_config(spec)
        try:
            return fastsam3d.load_model(spec, device=str(device), config=config)
        except (ValueError, KeyError, RuntimeError) as e:
            if _is_training_checkpoint(spec):
                raise ValueError(
                    f"{spec} is a fastsam3d-distill training checkpoint, not a "
                    "model: run `fastsam3d-distill export --checkpoint "
                    f"{spec} ...` first (or use the run's model.pth / "
                    "student.pth)"
                ) from None
            raise ValueError(f"{spec}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    raise FileNotFoundError(f"model checkpoint {spec} not found")


def _is_training_checkpoint(path: str) -> bool:
    from .state import CKPT_FORMAT

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT
