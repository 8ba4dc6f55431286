"""fastsam3d-distill: make fast FastSAM3D students from a SAM-Med3D-architecture teacher.

Stages (each a CLI subcommand and a Python function): ``cache`` teacher features, ``distill``
the encoder, ``finetune`` the prompt encoder + decoder with simulated clicks, ``evaluate``
with click simulation, ``export`` to the official container and safetensors. The networks,
crop geometry and preprocessing are fastsam3d's; nothing here re-implements them.
"""

from __future__ import annotations

from .distributed import DistEnv, init_distributed
from .engine import TrainConfig, Trainer
from .errors import DistillError, DistillUsageError
from .gating import BackwardGate

__version__ = "0.1.0"

__all__ = [
    "BackwardGate",
    "DistEnv",
    "DistillError",
    "DistillUsageError",
    "TrainConfig",
    "Trainer",
    "__version__",
    "init_distributed",
]
