"""The module's .ui file: valid Qt Designer XML, and every widget the code uses exists in it."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
UI = REPO / "FastSAM3DSlicer" / "Resources" / "UI" / "FastSAM3DSlicer.ui"
MODULE = REPO / "FastSAM3DSlicer" / "FastSAM3DSlicer.py"
QT_BUILTIN = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QProgressBar", "QCheckBox",
              "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QGroupBox", "QFrame"}


def ui_tree():
    return ET.parse(UI).getroot()


def widget_names(root) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def names_used_by_code() -> set[str]:
    """Every ``self.ui.<name>`` in the module file (childWidgetVariables looks them up)."""
    used = set()
    for node in ast.walk(ast.parse(MODULE.read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def test_ui_is_designer_xml_with_a_mrml_top_widget():
    root = ui_tree()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    assert root.findtext("class") == top.get("name")


def test_every_widget_the_code_uses_exists():
    names = widget_names(ui_tree())
    used = names_used_by_code()
    assert len(used) > 15  # the parser above really found the lookups
    missing = used - set(names)
    assert not missing, f"widgets used by FastSAM3DSlicer.py but absent from the .ui: {missing}"


def test_widget_names_are_unique_and_custom_widgets_declared():
    root = ui_tree()
    all_names = [w.get("name") for w in root.iter("widget")]
    assert len(all_names) == len(set(all_names))
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    for cls in {w.get("class") for w in root.iter("widget")}:
        assert cls in QT_BUILTIN or cls in declared, f"{cls} used but not declared"


def test_prompt_controls_document_their_shortcuts():
    names = {w.get("name"): w for w in ui_tree().iter("widget")}
    for name, key in (("positivePointButton", "P"), ("negativePointButton", "N"),
                      ("boxButton", "B"), ("undoButton", "Ctrl+Z")):
        text = names[name].find("property[@name='text']/string").text
        assert key in text, (name, text)
    source = MODULE.read_text()
    for key in ('"P"', '"N"', '"T"', '"B"', '"Ctrl+Z"'):
        assert key in source, key
