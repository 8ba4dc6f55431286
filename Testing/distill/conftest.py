"""Fixtures for the distill tests; makes both source trees importable without an install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
for sub in ("model/src", "distill/src"):
    p = str(REPO / sub)
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="session")
def crops() -> tuple[torch.Tensor, torch.Tensor]:
    from fastsam3d_distill.synthetic import synthetic_crops

    return synthetic_crops(4, seed=0)
