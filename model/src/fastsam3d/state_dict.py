"""The official checkpoints' container and key layout, for the PyTorch loader
(:mod:`fastsam3d.checkpoint`) and the torch-free one (:mod:`fastsam3d.onnx.runner`) alike: both
unwrap and rename the same way, whatever array type the file's tensors became."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: Top-level keys of the networks' parts in a full checkpoint.
PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
#: Keys under which training scripts nest the state dict (tried in this order).
CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")


def tensors_of(obj: Mapping, is_tensor: Callable[[Any], bool]) -> dict:
    """The tensors of a loaded checkpoint: the first nested container that exists, else ``obj``
    itself; entries that are not tensors (counters, arguments) dropped. Keys as stored."""
    for key in CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if is_tensor(v)}


def normalise_keys(sd: dict) -> dict:
    """Keys as the networks name them: DDP's ``module.`` stripped, and an encoder-only file
    (FastSAM3D's distilled encoder) given the ``image_encoder.`` prefix."""
    if all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if not any(str(k).startswith(PREFIXES) for k in sd) and "patch_embed.proj.weight" in sd:
        sd = {f"image_encoder.{k}": v for k, v in sd.items()}
    return sd
