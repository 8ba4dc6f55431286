"""The test markers and timeout of pytest.ini, and the rules Testing/conftest.py marks by."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.fixture(scope="module")
def conftest():
    spec = importlib.util.spec_from_file_location("_testing_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_markers_are_declared_strict_and_a_default_timeout_is_set(request):
    declared = {line.split(":")[0].strip() for line in request.config.getini("markers")}
    assert {"gpu", "slow", "slicer"} <= declared
    assert request.config.option.strict_markers
    assert float(request.config.getini("timeout")) == 600


def test_marking_rules(conftest):
    m = conftest.markers_for
    assert m("slicer/core/test_slicer_gil.py::test_poll", []) == {"slicer"}
    assert m("model/test_session.py::test_undo", []) == set()
    assert m("model/test_x.py::test_y", ["needs a CUDA GPU"]) == {"gpu"}
    assert m("model/test_x.py::test_y", ["git not installed"]) == set()
    slow = conftest.SLOW_TESTS[0]
    assert m(slow, []) == m(slow + "[fastsam3d]", []) == {"slow"}
    assert m(slow + "_other", []) == set()  # a prefix of the name is not the test


def test_every_slow_entry_names_an_existing_test(conftest):
    for entry in conftest.SLOW_TESTS:
        file, name = entry.split("::")
        source = (CONFTEST.parent / file).read_text(encoding="utf-8")
        assert f"def {name}(" in source, entry
