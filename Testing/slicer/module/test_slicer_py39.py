"""Slicer 5.8 runs Python 3.9: everything the module imports must import there (review B1).

``py39_import_check.py`` imports each module under CPython 3.9 with stand-ins for torch, numpy
and Slicer's packages (see its docstring for why the stand-ins cannot hide a 3.10-only
construct), and the same run on this test's Python is the control. A static scan adds what an
import cannot see: 3.10-only calls inside function bodies.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MODEL_SRC = REPO / "model" / "src"
MODULE_DIR = REPO / "FastSAM3DSlicer"
CHECK = Path(__file__).resolve().parent / "py39_import_check.py"
# Entry points of the command line, the benchmarks and the inference server: the Slicer module
# never imports them (test_slicer_code_never_imports_the_cli_only_modules), so they may use
# Python 3.10 and server-only packages. The client side (fastsam3d.remote) is checked.
CLI_ONLY = (
    "fastsam3d.cli",
    "fastsam3d.commands",
    "fastsam3d.bench",
    "fastsam3d.preview",
    "fastsam3d.serve",
)


def _python39() -> str | None:
    candidates = [
        os.environ.get("FASTSAM3D_PY39"),
        "/root/.pyenv/versions/3.9.18/bin/python",
        shutil.which("python3.9"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


PY39 = _python39()
needs_py39 = pytest.mark.skipif(
    PY39 is None,
    reason="no CPython 3.9 found (set FASTSAM3D_PY39): Slicer 5.8 compatibility is unchecked",
)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def slicer_modules() -> list[str]:
    """Every module of fastsam3d (less the CLI) and of the Slicer module, by file."""
    names = [_module_name(MODEL_SRC, p) for p in sorted((MODEL_SRC / "fastsam3d").rglob("*.py"))]
    names = [n for n in names if not n.startswith(CLI_ONLY)]
    for package in ("FastSAM3DSlicerLib", "FastSAM3DSlicerQt"):
        files = sorted((MODULE_DIR / package).glob("*.py"))
        names += [_module_name(MODULE_DIR, p) for p in files]
    return [*names, "FastSAM3DSlicer"]


def slicer_files() -> list[Path]:
    files = [
        p
        for p in sorted((MODEL_SRC / "fastsam3d").rglob("*.py"))
        if not _module_name(MODEL_SRC, p).startswith(CLI_ONLY)
    ]
    return files + sorted(MODULE_DIR.rglob("*.py"))


def run_check(
    python: str, model_src: Path, module_dir: Path, names: list[str]
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [python, "-I", str(CHECK), str(model_src), str(module_dir), *names],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _assert_all_ok(proc: subprocess.CompletedProcess, names: list[str]) -> None:
    failures = [ln for ln in proc.stdout.splitlines() if not ln.startswith("OK ")]
    assert proc.returncode == 0 and not failures, "\n".join(failures) + proc.stderr[-2000:]
    assert proc.stdout.split().count("OK") == len(names)


@needs_py39
def test_every_module_slicer_loads_imports_on_python39():
    names = slicer_modules()
    assert {
        "fastsam3d.hub",
        "fastsam3d.fastpath",
        "fastsam3d.session",
        "fastsam3d.checkpoint",
        "fastsam3d.modeling",
        "FastSAM3DSlicerLib.weights",
        "FastSAM3DSlicerLib.setup_flow",
        "FastSAM3DSlicerQt.setup_panel",
    } <= set(names)
    _assert_all_ok(run_check(PY39, MODEL_SRC, MODULE_DIR, names), names)


def test_the_stand_ins_import_everything_on_this_python():
    """The control: with this Python the same stand-ins must import every module."""
    names = slicer_modules()
    _assert_all_ok(run_check(sys.executable, MODEL_SRC, MODULE_DIR, names), names)


@needs_py39
def test_the_check_catches_a_runtime_pep604_alias(tmp_path):
    """The two aliases review B1 found, verbatim: 3.9 must fail, this Python must not."""
    pkg = tmp_path / "src" / "probe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "hub.py").write_text(
        "from __future__ import annotations\nfrom collections.abc import Callable\n"
        "ProgressCallback = Callable[[int, int | None], bool | None]\n"
    )
    (pkg / "fastpath.py").write_text(
        "from __future__ import annotations\nimport torch\n"
        "Tensors = tuple[torch.Tensor | None, ...]\n"
    )
    (pkg / "fine.py").write_text(
        "from __future__ import annotations\nimport torch\n"
        "def f(x: torch.Tensor | None) -> list[int] | None:\n    return None\n"
    )
    names = ["probe.hub", "probe.fastpath", "probe.fine"]
    old = run_check(PY39, tmp_path / "src", tmp_path, names)
    assert old.returncode == 1
    assert "FAIL probe.hub: TypeError" in old.stdout
    assert "FAIL probe.fastpath: TypeError" in old.stdout
    assert "OK probe.fine" in old.stdout  # annotations stay strings: not a false alarm
    _assert_all_ok(run_check(sys.executable, tmp_path / "src", tmp_path, names), names)


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (strings there under `from __future__`)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = [
                *args.posonlyargs,
                *args.args,
                *args.kwonlyargs,
                *(a for a in (args.vararg, args.kwarg) if a is not None),
            ]
            annotations += [a.annotation for a in every if a.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
        for ann in annotations:
            inside.update(id(n) for n in ast.walk(ann))
    return inside


def py310_only_constructs(path: Path) -> list[str]:
    """What compiles on 3.9 but fails when it runs there (an import cannot see these)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    has_future = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    in_annotation = _annotation_nodes(tree)
    if in_annotation and not has_future:
        found.append(
            f"{path}: annotations without `from __future__ import annotations` "
            "(3.9 would evaluate them)"
        )
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, ast.Call)
            and any(k.arg == "strict" for k in node.keywords)
            and (isinstance(node.func, ast.Name) and node.func.id == "zip")
        ):
            found.append(f"{where}: zip(strict=) is Python 3.10")
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.BitOr)
            and id(node) not in in_annotation
            and any(
                isinstance(s, ast.Constant) and s.value is None for s in (node.left, node.right)
            )
        ):
            found.append(f"{where}: `X | None` evaluated at run time (use typing.Optional)")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
            and isinstance(node.args[1], ast.BinOp)
        ):
            found.append(f"{where}: {node.func.id}(x, A | B) is Python 3.10 (use a tuple)")
    return found


def test_no_python310_only_constructs_in_what_slicer_runs():
    found = [msg for p in slicer_files() for msg in py310_only_constructs(p)]
    assert not found, "\n".join(found)


def test_the_static_scan_sees_the_constructs(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "x = int | None\ny = isinstance(1, int | str)\nz = zip([], [], strict=True)\n"
        "def f(a: int | None = None) -> int | None:\n    return a\n"
    )
    found = py310_only_constructs(probe)
    assert len(found) == 4, found  # future import, `| None` once (not the annotations), 2 calls


def test_slicer_code_never_imports_the_cli_only_modules():
    for path in slicer_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level and path.is_relative_to(MODEL_SRC):
                    pkg = _module_name(MODEL_SRC, path).split(".")
                    pkg = pkg[: len(pkg) - node.level + (path.name == "__init__.py")]
                    base = ".".join([*pkg, node.module])
                mods = [base, *(f"{base}.{a.name}" for a in node.names)]
            bad = [m for m in mods if m.startswith(CLI_ONLY)]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"
