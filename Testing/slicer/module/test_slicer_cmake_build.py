"""Configure the extension's CMake against a stand-in of Slicer's macros and use the result.

The stand-in (cmake_stub/) copies files the way Slicer's build lays out a scripted module, so
this checks what the packaged extension contains: the module, every Lib and Qt-side file, the
resources and the fastsam3d package from model/src, all in one directory, importable without
the source tree.
Slicer's real macros also byte-compile and install; only a real Slicer build can confirm those.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
STUB = Path(__file__).resolve().parent / "cmake_stub"

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extension-build")
    proc = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(out), f"-DSlicer_DIR={STUB}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_package_layout(build):
    modules = build / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    # Slicer's module factory registers every .py of this directory as a module of its own:
    # the Lib and the Qt side must stay packages below it.
    assert {p.name for p in modules.glob("*.py")} == {"FastSAM3DSlicer.py"}
    for package in ("FastSAM3DSlicerLib", "FastSAM3DSlicerQt"):
        packaged = {p.name for p in (modules / package).glob("*.py")}
        assert packaged == {p.name for p in (REPO / "FastSAM3DSlicer" / package).glob("*.py")}
    assert (modules / "Resources" / "UI" / "FastSAM3DSlicer.ui").is_file()
    assert (modules / "Resources" / "Icons" / "FastSAM3DSlicer.png").is_file()
    src = REPO / "model" / "src" / "fastsam3d"
    expected = {
        p.relative_to(src).as_posix() for p in src.rglob("*.py") if "__pycache__" not in p.parts
    }
    got = {
        p.relative_to(modules / "fastsam3d").as_posix()
        for p in (modules / "fastsam3d").rglob("*.py")
    }
    assert got == expected
    tests = (build / "tests.txt").read_text(encoding="utf-8").split()
    assert [Path(t).name for t in tests] == ["FastSAM3DSlicer.py"]


def test_installed_lib_finds_the_installed_fastsam3d(build, tmp_path):
    modules = build / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from FastSAM3DSlicerLib import engine; engine.ensure_fastsam3d_importable();"
        "import importlib.util; print(importlib.util.find_spec('fastsam3d').origin)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(modules)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().is_relative_to(modules.resolve())
