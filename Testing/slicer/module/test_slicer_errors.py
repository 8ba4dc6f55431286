"""Style review 4 for the Slicer Lib: every error class the Lib defines derives from
FastSAM3DSlicerError (directly or through another Lib error), so the Widget can catch them with
one ``except``. Read with ``ast``: nothing is imported, no Slicer needed."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[3] / "FastSAM3DSlicer" / "FastSAM3DSlicerLib"
ROOT = "FastSAM3DSlicerError"


def _classes() -> dict[str, tuple[str, list[str]]]:
    """{class name: (file, base names)} of every class in the Lib whose name ends in Error."""
    found = {}
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
                found[node.name] = (path.name, bases)
    return found


def test_every_lib_error_derives_from_the_lib_root():
    classes = _classes()
    assert classes[ROOT] == ("errors.py", ["Exception"])
    assert {"NoTargetError", "BusyError", "BackendError", "GeometryError"} <= set(classes)

    def rooted(name: str) -> bool:
        return name == ROOT or (name in classes and any(rooted(b) for b in classes[name][1]))

    unrooted = [f"{f}:{n}" for n, (f, _) in classes.items() if not rooted(n)]
    assert not unrooted, f"Lib errors outside {ROOT}: {unrooted}"


def test_lib_errors_keep_their_builtin_base():
    """`except ValueError` / `except RuntimeError` in callers keeps working."""
    for name, (_, bases) in _classes().items():
        if name != ROOT:
            assert {"ValueError", "RuntimeError"} & set(bases) or any(
                b.endswith("Error") and b != ROOT for b in bases
            ), name
