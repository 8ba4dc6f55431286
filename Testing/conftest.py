"""Shared pytest configuration: fixed thread count, the shared parity fixture, test markers."""

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


# ----------------------------------------------------------------------------- markers
# Declared in pytest.ini (--strict-markers). `slicer` follows the folder; `slow` is this list of
# tests measured over ~30 s on 2 busy cores ("file::test" prefixes, parametrisations included),
# kept here so that marking needs no edit of the test files; `gpu` tests skip without CUDA.
SLOW_TESTS = (
    "model/test_cpu_fastpath.py::test_bf16_encoder_masks_agree_with_fp32",
    "model/test_session_cli.py::test_checkpoint_path_gives_the_same_mask_as_the_model_it_holds",
    "model/test_parity.py::test_einsum_reference_backend_agrees_with_default",
)
_TESTING = Path(__file__).resolve().parent


def markers_for(test_id: str, skip_reasons: list[str]) -> set[str]:
    """The markers this conftest adds to a test, from its id under Testing/ ("model/x.py::t[p]")
    and the reasons of its skipif marks (an older hand-written CUDA skipif makes it a gpu test)."""
    out = set()
    if test_id.startswith("slicer/"):
        out.add("slicer")
    if any(test_id == s or test_id.startswith(s + "[") for s in SLOW_TESTS):
        out.add("slow")
    if any("cuda" in r.lower() for r in skip_reasons):
        out.add("gpu")
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        path = Path(str(item.path)).resolve()
        rel = path.relative_to(_TESTING).as_posix() if _TESTING in path.parents else path.name
        reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
        for name in sorted(markers_for(f"{rel}::{item.name}", reasons)):
            item.add_marker(getattr(pytest.mark, name))
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)
