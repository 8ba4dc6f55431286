"""Fixtures for the slicer-core tests; the scene builder and session stub are in slicer_scene."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slicer_scene import Scene, StubEngine, build_scene  # noqa: E402


@pytest.fixture
def scene() -> Scene:
    return build_scene()


@pytest.fixture
def stub_engine() -> StubEngine:
    return StubEngine()
