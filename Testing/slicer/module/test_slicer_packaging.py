"""Extension packaging: what the Slicer build and the Extensions Index checks read.

These are the failures that make an extension "work from source but not when installed"
(unlisted Lib files, missing icon, metadata the Index rejects, torch imported at load time).
"""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "FastSAM3DSlicer"
INDEX_JSON = REPO / "FastSAM3DSlicer.json"
# Scripted-module code may import these at file scope (the Index review allows Slicer, vtk,
# SimpleITK, numpy, scipy; the module file itself keeps to Slicer's own and the stdlib).
SLICER_PROVIDED = {"qt", "ctk", "slicer", "vtk", "SampleData", "PyTorchUtils"}
LIB_FILE_SCOPE_ALLOWED = SLICER_PROVIDED | {"numpy"}
# The accepted categories include these (Slicer/ExtensionsIndex check_description_files.py).
ACCEPTED_CATEGORIES = {
    "Segmentation",
    "Active Learning",
    "Utilities",
    "Registration",
    "Quantification",
    "Deep Learning",
}
INDEX_PROPERTIES = {  # schema v1.0.2: name -> JSON type
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
    "dicom_support_rule": (str, dict, list),
}
INDEX_REQUIRED = ("$schema", "category", "scm_url")


def cmake_sets(path: Path) -> dict[str, str]:
    """`set(NAME "value")` as written: the Index reads the file as text and expands nothing."""
    text = path.read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r'set\(\s*(\w+)\s+"((?:[^"\\]|\\.)*)"\s*\)', text):
        out[m.group(1)] = m.group(2)
    return out


def cmake_list(path: Path, name: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    m = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.S)
    assert m, f"{name} not set in {path}"
    return [t.replace("${MODULE_NAME}", "FastSAM3DSlicer") for t in m.group(1).split()]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def raw_url_to_path(url: str) -> Path:
    m = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)", url)
    assert m, f"{url} is not a raw.githubusercontent.com URL on the main branch"
    return REPO / m.group(1)


# ---------------------------------------------------------------------------------------------


def test_top_level_cmake_has_every_index_field():
    sets = cmake_sets(REPO / "CMakeLists.txt")
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(\s*FastSAM3DSlicer\s*\)", text)
    for field in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert sets.get(field, "").strip(), f"{field} missing or empty"
    assert sets["EXTENSION_CATEGORY"] == "Segmentation"
    assert sets["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    assert sets["EXTENSION_HOMEPAGE"].startswith("https://")
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert "${" not in sets[field], f"{field} must be literal: the Index expands no variables"
        assert all(u.startswith("https://") for u in sets[field].split()), field
    # m15: the 5.10+ extension template's CMake range (SlicerConfig sets its own policies).
    assert text.startswith("cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)")
    assert "example.com" not in text and "TemplateKey" not in text
    for needed in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(FastSAM3DSlicer)",
        "${Slicer_EXTENSION_GENERATE_CONFIG}",
        "${Slicer_EXTENSION_CPACK}",
    ):
        assert needed in text, needed


def test_icon_and_screenshot_urls_point_at_committed_pngs():
    sets = cmake_sets(REPO / "CMakeLists.txt")
    icon = raw_url_to_path(sets["EXTENSION_ICONURL"])
    assert icon.is_file(), icon
    assert png_size(icon) == (128, 128)
    shots = sets["EXTENSION_SCREENSHOTURLS"].split()
    assert shots
    for url in shots:
        assert raw_url_to_path(url).is_file(), url
        png_size(raw_url_to_path(url))


def test_module_cmake_lists_every_python_file_and_resource():
    cmake = MODULE_DIR / "CMakeLists.txt"
    listed = set(cmake_list(cmake, "MODULE_PYTHON_SCRIPTS"))
    on_disk = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk == listed, (
        f"not listed (would not be packaged): {sorted(on_disk - listed)}; "
        f"listed but missing: {sorted(listed - on_disk)}"
    )
    for res in cmake_list(cmake, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / res).is_file(), res
    text = cmake.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text
    assert "WITH_GENERIC_TESTS" in text


def test_fastsam3d_package_comes_from_model_src_without_a_copy():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    m = re.search(r"set\(FASTSAM3D_SOURCE_DIR\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", text)
    assert m, "FASTSAM3D_SOURCE_DIR must point into the repository"
    src = (MODULE_DIR / m.group(1)).resolve()
    assert src == (REPO / "model" / "src").resolve()
    assert (src / "fastsam3d" / "__init__.py").is_file()
    assert "ctkMacroCompilePythonScript(" in text and "fastsam3d/*.py" in text
    assert not any(MODULE_DIR.rglob("fastsam3d")), "a copy of fastsam3d inside the module"


def test_index_json_is_valid_and_matches_cmake():
    raw = INDEX_JSON.read_bytes()
    assert b"\r" not in raw, "the Index requires LF line endings"
    entry = json.loads(raw)
    for key in INDEX_REQUIRED:
        assert key in entry, key
    for key, value in entry.items():
        assert key in INDEX_PROPERTIES, f"property {key!r} is not allowed by the schema"
        assert isinstance(value, INDEX_PROPERTIES[key]), key
    assert re.fullmatch(
        r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
        r"slicer-extension-catalog-entry-schema-v1\.0\.2\.json#?",
        entry["$schema"],
    )
    sets = cmake_sets(REPO / "CMakeLists.txt")
    assert entry["category"] == sets["EXTENSION_CATEGORY"]
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert entry["build_dependencies"] == sets["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].startswith(("https://", "git://"))
    assert entry["scm_url"].removesuffix(".git") in sets["EXTENSION_HOMEPAGE"]
    assert INDEX_JSON.stem == "FastSAM3DSlicer" and not INDEX_JSON.stem.startswith("Slicer")
    if "tier" in entry:
        assert 1 <= entry["tier"] <= 5


def test_index_json_against_schema_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    props = {
        k: {
            "type": {str: "string", list: "array", bool: "boolean", int: "integer"}.get(
                v, ["string", "object", "array"]
            )
        }
        for k, v in INDEX_PROPERTIES.items()
    }
    props["build_dependencies"]["items"] = {"type": "string"}
    props["scm_type"]["enum"] = ["git", "local"]
    props["tier"].update(minimum=1, maximum=5)
    schema = {
        "type": "object",
        "required": list(INDEX_REQUIRED),
        "properties": props,
        "additionalProperties": False,
    }
    jsonschema.validate(json.loads(INDEX_JSON.read_text(encoding="utf-8")), schema)


def test_requirements_file_matches_the_lib():
    sys.path.insert(0, str(MODULE_DIR))
    from FastSAM3DSlicerLib import deps

    text = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines == list(deps.PIP_REQUIREMENTS)
    assert not any(deps.parse(ln)[0].lower() == "torch" for ln in lines), "torch via PyTorchUtils"
    assert all(">=" in ln and "==" not in ln for ln in lines), "floors, not pins"


def _file_scope_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Try):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.level == 0:
                    names.add(sub.module.split(".")[0])
    return names


def test_no_third_party_imports_or_work_at_module_import_time():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    module_imports = _file_scope_imports(MODULE_DIR / "FastSAM3DSlicer.py") - {"FastSAM3DSlicerQt"}
    assert module_imports <= stdlib | SLICER_PROVIDED, module_imports - stdlib - SLICER_PROVIDED
    # The Widget's panel mixins are imported with the module file: they import as little.
    for name in ("setup_panel.py", "prompts_panel.py"):
        extra = _file_scope_imports(MODULE_DIR / "FastSAM3DSlicerQt" / name) - stdlib
        assert extra <= SLICER_PROVIDED, f"{name} imports {extra - SLICER_PROVIDED} at file scope"
    for path in (MODULE_DIR / "FastSAM3DSlicerLib").glob("*.py"):
        extra = _file_scope_imports(path) - stdlib - LIB_FILE_SCOPE_ALLOWED
        assert not extra, f"{path.name} imports {extra} at file scope"
    # The module file's top level holds only imports, constants, classes and small helpers.
    tree = ast.parse((MODULE_DIR / "FastSAM3DSlicer.py").read_text(encoding="utf-8"))
    for node in tree.body:
        assert isinstance(
            node,
            (
                ast.Import,
                ast.ImportFrom,
                ast.ClassDef,
                ast.FunctionDef,
                ast.Assign,
                ast.Try,
                ast.Expr,
            ),
        ), ast.dump(node)[:80]
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant), "code executed at import time"


# The self-test's body runs only inside the Slicer application (it sends Qt mouse events to a
# slice view); its helpers that pytest uses import no Qt (test_slicer_selftest.py).
APP_ONLY = {"selftest.py"}


def test_lib_imports_no_qt_anywhere():
    for path in (MODULE_DIR / "FastSAM3DSlicerLib").glob("*.py"):
        if path.name in APP_ONLY:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            for mod in mods:
                root = mod.split(".")[0]
                assert root not in {"qt", "ctk", "PythonQt", "PyQt5", "PySide2"}, (path, mod)
                assert mod != "slicer.util", f"{path.name}: slicer.util needs the Slicer app"


def test_self_test_is_registered_and_exists():
    cmake = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\S*FastSAM3DSlicer\.py", cmake)
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    testing_cmake = (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(Testing)" in module_cmake
    assert "add_subdirectory(Python)" in testing_cmake
    tree = ast.parse((MODULE_DIR / "FastSAM3DSlicer.py").read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name in (
        "FastSAM3DSlicer",
        "FastSAM3DSlicerWidget",
        "FastSAM3DSlicerLogic",
        "FastSAM3DSlicerTest",
    ):
        assert name in classes, name
    methods = {
        f.name for f in classes["FastSAM3DSlicerTest"].body if isinstance(f, ast.FunctionDef)
    }
    assert "runTest" in methods and any(m.startswith("test_") for m in methods)


def test_no_weights_in_the_extension_sources():
    found = [
        p
        for d in (MODULE_DIR, REPO / "Resources")
        for p in d.rglob("*")
        if p.suffix in {".pth", ".pt", ".safetensors", ".ckpt"}
    ]
    assert not found, found


def test_source_checkout_puts_model_src_on_sys_path(tmp_path):
    # -S: no site-packages, so an installed fastsam3d cannot hide the fallback under test.
    import subprocess

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from FastSAM3DSlicerLib import engine; engine.ensure_fastsam3d_importable();"
        "import importlib.util; print(importlib.util.find_spec('fastsam3d').origin)"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(MODULE_DIR)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    origin = Path(proc.stdout.strip()).resolve()
    assert origin == (REPO / "model" / "src" / "fastsam3d" / "__init__.py").resolve()


def test_widget_uses_only_names_the_lib_defines():
    """The Widget cannot run here; at least every Lib name and logic method it uses must exist."""
    import importlib

    sys.path.insert(0, str(MODULE_DIR))
    from FastSAM3DSlicerLib.logic import InteractiveLogic

    sources = [
        MODULE_DIR / "FastSAM3DSlicer.py",
        *sorted(MODULE_DIR.glob("FastSAM3DSlicerQt/*.py")),
    ]
    tree = ast.Module(
        body=[ast.parse(p.read_text(encoding="utf-8")) for p in sources], type_ignores=[]
    )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("FastSAM3DSlicerLib")
        ):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ), f"{node.module}.{alias.name}"
    logic = InteractiveLogic.__new__(InteractiveLogic)
    InteractiveLogic.__init__(logic, engine=None, worker=None)
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "logic"
        and isinstance(n.value.value, ast.Name)
        and n.value.value.id == "self"
    }
    assert used, "no self.logic.<name> found"
    missing = {name for name in used if not hasattr(logic, name)}
    logic.close()
    assert not missing, f"the Widget uses InteractiveLogic.{missing}, which do not exist"


def test_placeholder_repository_is_marked_until_replaced():
    """The repository URL is a placeholder until the real one exists: it must say so."""
    entry = json.loads(INDEX_JSON.read_text(encoding="utf-8"))
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    docs = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    placeholder = "github.com/FastSAM3DSlicer/SlicerFastSAM3D"
    if placeholder in entry["scm_url"] or placeholder in cmake:
        assert "PLACEHOLDER repository" in cmake
        assert placeholder in docs and "Before submitting to the Extensions Index" in docs
    urls = [entry["scm_url"], *re.findall(r'"(https://[^" ]+)', cmake)]
    owners = {
        re.sub(
            r"https://(raw\.githubusercontent\.com|github\.com)/([^/]+)/([^/#]+).*", r"\2/\3", u
        ).removesuffix(".git")
        for u in urls
    }
    assert len(owners) == 1, f"every URL must name the same repository: {owners}"
