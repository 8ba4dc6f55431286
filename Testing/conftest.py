"""Shared pytest configuration: fixed thread count and paths to the shared parity fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The parity fixture lives in ../shared/parity beside the checkout (CI clones there too);
# FASTSAM3D_PARITY_DIR overrides it.
PARITY_DIR = Path(os.environ.get("FASTSAM3D_PARITY_DIR", REPO.parent / "shared" / "parity"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_DIR / "parity.npz").exists():
        pytest.fail(f"parity fixture not found at {PARITY_DIR} (set FASTSAM3D_PARITY_DIR)")
    return PARITY_DIR


# CI runs the property tests on a fixed example sequence (a landing must not depend on which
# random examples a run drew); local runs keep exploring new examples.
try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is a test extra; suites that need it import it themselves
    pass
