"""The module's .ui file: valid Qt Designer XML, and every widget the code uses exists in it."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
UI = REPO / "FastSAM3DSlicer" / "Resources" / "UI" / "FastSAM3DSlicer.ui"
MODULE = REPO / "FastSAM3DSlicer" / "FastSAM3DSlicer.py"
#: The Qt side beside the Widget (FastSAM3DSlicerQt): it reaches the panel's widgets too.
QT_SIDE = sorted((REPO / "FastSAM3DSlicer" / "FastSAM3DSlicerQt").glob("*.py"))
MARKERS = REPO / "FastSAM3DSlicer" / "FastSAM3DSlicerLib" / "markers.py"
SETUP_FLOW = REPO / "FastSAM3DSlicer" / "FastSAM3DSlicerLib" / "setup_flow.py"
QT_BUILTIN = {
    "QWidget",
    "QLabel",
    "QPushButton",
    "QComboBox",
    "QProgressBar",
    "QCheckBox",
    "QSpinBox",
    "QDoubleSpinBox",
    "QLineEdit",
    "QGroupBox",
    "QFrame",
}


def ui_tree():
    return ET.parse(UI).getroot()


def widget_names(root) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def names_used_by_code() -> set[str]:
    """Every ``self.ui.<name>`` in the module file and its Qt side (childWidgetVariables looks
    them up), and every control the Lib's enabled_controls rules name."""
    used = set()
    for path in [MODULE, *QT_SIDE]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"
            ):
                used.add(node.attr)
    return used | controls_named_by_the_lib()


def controls_named_by_the_lib() -> set[str]:
    """The keys of the dict setup_flow.enabled_controls returns (the Widget sets each one)."""
    for node in ast.walk(ast.parse(SETUP_FLOW.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name == "enabled_controls":
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            return {k.value for k in returns[-1].value.keys}
    raise AssertionError("enabled_controls not found")


def test_ui_is_designer_xml_with_a_mrml_top_widget():
    root = ui_tree()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    assert root.findtext("class") == top.get("name")


def test_every_widget_the_code_uses_exists():
    names = widget_names(ui_tree())
    used = names_used_by_code()
    assert len(used) > 15 and len(controls_named_by_the_lib()) >= 9  # the parsers found them
    missing = used - set(names)
    assert not missing, f"widgets used by FastSAM3DSlicer.py but absent from the .ui: {missing}"


def test_widget_names_are_unique_and_custom_widgets_declared():
    root = ui_tree()
    all_names = [w.get("name") for w in root.iter("widget")]
    assert len(all_names) == len(set(all_names))
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    for cls in {w.get("class") for w in root.iter("widget")}:
        assert cls in QT_BUILTIN or cls in declared, f"{cls} used but not declared"


def shortcuts() -> dict[str, str]:
    """The module's SHORTCUTS table (key -> Widget method), read from the source."""
    for node in ast.parse(MODULE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHORTCUTS":
            return dict(ast.literal_eval(node.value))
    raise AssertionError("SHORTCUTS not found")


def widget_methods() -> dict[str, ast.FunctionDef]:
    """The Widget's methods, its panel mixins' (FastSAM3DSlicerQt setup_panel, prompts_panel)
    included: one object, its slots in three files."""
    methods = {}
    for path in [MODULE, *QT_SIDE]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name in PANEL_CLASSES:
                methods.update({f.name: f for f in node.body if isinstance(f, ast.FunctionDef)})
    (widget,) = [
        n
        for n in ast.parse(MODULE.read_text(encoding="utf-8")).body
        if isinstance(n, ast.ClassDef) and n.name == "FastSAM3DSlicerWidget"
    ]
    assert {"SetupPanel", "PromptsPanel"} <= {getattr(b, "id", "") for b in widget.bases}
    return methods


PANEL_CLASSES = {"FastSAM3DSlicerWidget", "SetupPanel", "PromptsPanel"}


def calls_in(func: ast.FunctionDef) -> list[ast.Call]:
    return [n for n in ast.walk(func) if isinstance(n, ast.Call)]


def called_names(func: ast.FunctionDef) -> set[str]:
    out = set()
    for call in calls_in(func):
        f = call.func
        out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


#: SlicerNNInteractive's permanent main-window shortcuts (SlicerNNInteractive.py,
#: setup_shortcuts): with both extensions loaded, a key both claim fires neither (review m5).
NNINTERACTIVE_KEYS = {"p", "b", "l", "s", "e", "r", "t", "v", "delete", "ctrl+z"}
#: Keys Slicer's slice views use (vtkMRMLSliceIntersectionWidget, vtkSlicerMarkupsWidget).
SLICE_VIEW_KEYS = {
    "g",
    "t",
    "f",
    "b",
    "v",
    "r",
    "s",
    "delete",
    "backspace",
    "left",
    "right",
    "up",
    "down",
    "[",
    "]",
    "{",
    "}",
}


def test_shortcuts_avoid_nninteractive_and_slice_view_keys():
    keys = {k.lower() for k in shortcuts()}
    assert len(keys) == len(shortcuts()) >= 8
    assert not keys & NNINTERACTIVE_KEYS, keys & NNINTERACTIVE_KEYS
    assert not keys & SLICE_VIEW_KEYS, keys & SLICE_VIEW_KEYS


def test_every_shortcut_calls_a_widget_method_and_buttons_show_their_key():
    methods = widget_methods()
    table = shortcuts()
    for key, method in table.items():
        assert method in methods, (key, method)
    names = {w.get("name"): w for w in ui_tree().iter("widget")}
    for name, key in (
        ("positivePointButton", "A"),
        ("negativePointButton", "X"),
        ("undoButton", "U"),
        ("resetSegmentButton", "C"),
        ("newSegmentButton", "N"),
    ):
        assert key in table
        text = names[name].find("property[@name='text']/string").text
        assert f"({key})" in text, (name, text)


def test_shortcuts_are_documented_in_docs():
    doc = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    for key in shortcuts():
        assert f"| {key} |" in doc, f"docs/slicer.md does not list the {key} key"


def test_leaving_the_module_stops_effects_views_and_prompting():
    """Review M5/M9/m10: exit deactivates editor effects, removes its view observations, stops
    prompting (cursor, event filters); cleanup and aboutToQuit stop the work."""
    methods = widget_methods()
    exit_calls = calls_in(methods["exit"])
    effect = [c for c in exit_calls if getattr(c.func, "attr", "") == "setActiveEffect"]
    assert effect and isinstance(effect[0].args[0], ast.Constant)
    assert effect[0].args[0].value is None
    assert {"removeViewObservations", "_stopViews", "_removeShortcuts"} <= called_names(
        methods["exit"]
    )
    assert {"_setPrompting", "_removeViewFilters"} <= called_names(methods["_stopViews"])
    assert {"_stopViews", "_shutdownWork", "removeObservers"} <= called_names(methods["cleanup"])
    assert {"_stopViews", "_shutdownWork"} <= called_names(methods["onAboutToQuit"])
    assert "aboutToQuit()" in MODULE.read_text(encoding="utf-8")


def test_no_markups_place_mode_and_no_deprecated_label_format():
    """Review M6/M9 (place mode drifted, kept the active place node) and m11."""
    source = "".join(p.read_text(encoding="utf-8") for p in [MODULE, MARKERS, *QT_SIDE])
    assert "SetActivePlaceNodeID" not in source and ".Place)" not in source
    assert "SetMarkupLabelFormat" not in source
    assert "SetControlPointLabelFormat" in source


def test_editor_uses_the_segment_editor_singleton():
    """Review M4: masking is the Segment Editor module's own node, not a private one."""
    masking = REPO / "FastSAM3DSlicer" / "FastSAM3DSlicerQt" / "masking.py"
    section = {
        f.name: f
        for f in ast.walk(ast.parse(masking.read_text(encoding="utf-8")))
        if isinstance(f, ast.FunctionDef)
    }
    assert "segment_editor_node" in called_names(section["select"])
    assert {"select"} <= called_names(widget_methods()["onSceneClosed"])
    for path in [MODULE, *QT_SIDE]:
        assert "SetSingletonTag" not in path.read_text(encoding="utf-8"), path
    names = widget_names(ui_tree())
    for name in (
        "editableAreaComboBox",
        "intensityMaskCheckBox",
        "intensityRangeWidget",
        "overwriteModeComboBox",
    ):
        assert name in names, name


#: What Slicer's ScriptedLoadableModuleWidget and VTKObservationMixin give the Widget.
WIDGET_BASE_NAMES = {
    "parent",
    "layout",
    "moduleName",
    "developerMode",
    "resourcePath",
    "addObserver",
    "removeObserver",
    "hasObserver",
    "removeObservers",
}


def test_every_name_the_panel_reaches_on_self_is_defined():
    """The Widget's slots live in three files (the module, setup_panel, prompts_panel): every
    ``self.<name>`` read there, and every shortcut's method, is a method or an attribute one
    of them sets, or the Slicer base classes' (a slot moved without its helper fails here, not
    at a click in Slicer)."""
    defined, read = set(WIDGET_BASE_NAMES), {}
    for path in [MODULE, *QT_SIDE]:
        for cls in ast.parse(path.read_text(encoding="utf-8")).body:
            if not (isinstance(cls, ast.ClassDef) and cls.name in PANEL_CLASSES):
                continue
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef):
                    defined.add(node.name)
                elif (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "self"
                ):
                    if isinstance(node.ctx, ast.Store):
                        defined.add(node.attr)
                    else:
                        read.setdefault(node.attr, path.name)
    missing = {name: where for name, where in read.items() if name not in defined}
    assert not missing, missing
    assert set(shortcuts().values()) <= defined
