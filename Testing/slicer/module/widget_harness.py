"""FastSAM3DSlicer.py loaded on real MRML with Qt and the Slicer app stood in, for tests.

The stand-ins are the Widget helper's (Testing/slicer/core/test_interaction_widget.py); this
adds what the self-test and the install flow reach: mouse events sent to a slice view,
``slicer.modules``, the layout manager, dialogs and the extensions manager as recorders, and
Slicer's ``@parameterNodeWrapper`` for the module's str/bool fields (on a real scripted module
node, so the parameter node's defaults and round trip are real MRML).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import typing
import weakref
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "Testing" / "slicer" / "core"))
sys.path.insert(0, str(REPO / "FastSAM3DSlicer"))

import test_interaction_widget as harness  # noqa: E402
import vtk  # noqa: E402
from slicer_scene import slicer  # noqa: E402

from FastSAM3DSlicerLib import interaction, params  # noqa: E402


class UI(types.SimpleNamespace):
    """The Widget's ``self.ui``: the named widgets given, any other a permissive stand-in."""

    def __getattr__(self, name: str) -> Any:
        return self.__dict__.setdefault(name, harness.Widget())


class Button(harness.Widget):
    def __init__(self, slot: Any) -> None:
        super().__init__()
        self.slot, self.enabled = slot, True

    def click(self) -> None:
        if self.enabled:
            self.slot()


def parameter_node_wrapper(cls: type) -> type:
    """Slicer's ``@parameterNodeWrapper`` (slicer/parameterNodeWrapper/wrapper.py) for plain
    ``str``/``bool`` fields: typed attributes kept as the node's string parameters, each default
    written when the node does not have it yet; unknown names refused, as the real one does.
    Reads come from a cache that each field's own ModifiedEvent observer (priority 0, added
    with the wrapper) refreshes, as the real _CachedParameterWrapper's: an observer of the
    node's changes added later at the same priority may run before them and read stale values
    (VTK calls equal priorities out of order)."""
    hints = typing.get_type_hints(cls)
    defaults = {name: getattr(cls, name) for name in hints}

    class Wrapped:
        allParameters = hints

        def __init__(self, node: Any) -> None:
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_cache", {})
            object.__setattr__(self, "_tags", [])
            for name, value in defaults.items():
                if not node.GetParameter(name):
                    node.SetParameter(name, str(hints[name](value)))
            me = weakref.ref(self)
            for name in hints:
                self._cache[name] = self._read(name)
                self._tags.append(
                    node.AddObserver(
                        vtk.vtkCommand.ModifiedEvent,
                        lambda caller, event, name=name: me() and me()._refresh(name),
                    )
                )

        def __del__(self) -> None:
            for tag in self._tags:
                self.parameterNode.RemoveObserver(tag)

        def _read(self, name: str) -> Any:
            text = self.parameterNode.GetParameter(name)
            return text == "True" if hints[name] is bool else hints[name](text)

        def _refresh(self, name: str) -> None:
            self._cache[name] = self._read(name)

        def __getattr__(self, name: str) -> Any:
            if name not in hints:
                raise AttributeError(name)
            return self._cache[name]

        def __setattr__(self, name: str, value: Any) -> None:
            if name not in hints:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            self.parameterNode.SetParameter(name, str(hints[name](value)))
            self._cache[name] = self._read(name)

    Wrapped.__name__ = cls.__name__
    return Wrapped


def _scripted_module_node(self: Any) -> Any:
    """ScriptedLoadableModuleLogic.getParameterNode: the module's singleton node in the scene."""
    node = slicer.mrmlScene.GetSingletonNode("FastSAM3DSlicer", "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag("FastSAM3DSlicer")
        node.SetAttribute("ModuleName", "FastSAM3DSlicer")
        node = slicer.mrmlScene.AddNode(node)
    return node


def load_widget(
    monkeypatch: Any, scene: Any, *, app: dict | None = None, util: dict | None = None
) -> types.SimpleNamespace:
    """Import FastSAM3DSlicer.py against the stand-ins and build a Widget on ``scene``.

    ``app``/``util`` add or replace attributes of ``slicer.app`` / ``slicer.util``. Returns
    the module, the Widget, the Red slice view stand-in and the recorded calls."""
    qt = harness.fake_qt()
    harness.FakeTimer.pending = []
    harness.FakeSettings.data = {}
    views: dict = {}
    calls: list = []
    ns = types.SimpleNamespace(calls=calls, views=views)

    def send_event(view: Any, event: Any) -> bool:
        return ns.widget.onViewEvent(views[id(view)], view, event)

    qt.QPointF = lambda x, y: types.SimpleNamespace(x=lambda: x, y=lambda: y)
    qt.QMouseEvent = lambda kind, pos, button, buttons, modifiers: harness.Event(
        kind, button, buttons, modifiers, (pos.x(), pos.y())
    )
    qt.QApplication = types.SimpleNamespace(
        sendEvent=send_event,
        restoreOverrideCursor=lambda: None,
        setOverrideCursor=lambda *a: None,
        overrideCursor=lambda: None,
    )
    qt.Qt.NoButton = 0
    monkeypatch.setitem(sys.modules, "qt", qt)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in (
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
    ):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a: None}))
    slm.ScriptedLoadableModuleLogic.getParameterNode = _scripted_module_node
    slm.ScriptedLoadableModuleWidget.setup = lambda self: None  # the reload/test buttons
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = parameter_node_wrapper
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    for name in [m for m in sys.modules if m.split(".")[0] == "FastSAM3DSlicerQt"]:
        monkeypatch.delitem(sys.modules, name)  # imported again against these stand-ins

    def process_events() -> None:
        while harness.FakeTimer.pending:
            harness.FakeTimer.pending.pop(0)()

    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetDimensions(400, 300, 1)
    slice_node.SetFieldOfView(160.0, 120.0, 1.0)  # 0.4 mm per pixel, axial
    red = harness.SliceWidget(slice_node, None)
    views[id(red.view)] = red
    layout = types.SimpleNamespace(
        sliceWidget=lambda name: red if name == "Red" else None, sliceViewNames=lambda: ["Red"]
    )
    interaction_node = scene.AddNewNodeByClass("vtkMRMLInteractionNode")
    app_attrs = dict(
        processEvents=process_events,
        testingEnabled=lambda: True,
        layoutManager=lambda: layout,
        applicationLogic=lambda: types.SimpleNamespace(GetInteractionNode=lambda: interaction_node),
        connect=lambda *a: calls.append(("connect",) + a),
        disconnect=lambda *a: None,
        majorVersion=5,
        minorVersion=12,
        extensionsManagerModel=lambda: None,
    )
    app_attrs.update(app or {})
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(**app_attrs), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    util_attrs = {
        "showStatusMessage": lambda *a: None,
        "setSliceViewerLayers": lambda **k: None,
        "selectModule": lambda m: calls.append(("selectModule", m)),
        "selectedModule": lambda: "FastSAM3DSlicer",  # shown: the self-test calls enter()
        "tryWithErrorDisplay": lambda *a, **k: contextlib.nullcontext(),
        "WaitCursor": contextlib.nullcontext,
        "mainWindow": lambda: None,
    }
    util_attrs.update(util or {})
    for name, value in util_attrs.items():
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    spec = importlib.util.spec_from_file_location(
        "FastSAM3DSlicer_under_stand_ins", REPO / "FastSAM3DSlicer" / "FastSAM3DSlicer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    widget = module.FastSAM3DSlicerWidget(None)
    editor = harness.Editor()
    editor.owner = widget
    widget.ui = UI(
        segmentEditorWidget=editor,
        statusLabel=harness.Widget(text=""),
        latencyLabel=harness.Widget(text=""),
        dependenciesStatusLabel=harness.Widget(text=""),
        deviceComboBox=harness.ComboBox([(name, name) for name in params.DEVICES]),
        weightsComboBox=harness.ComboBox(),
        undoButton=Button(widget.onUndo),
    )
    widget.capture = interaction.PromptCapture()
    widget.initializeParameterNode()
    widget.pollTimer = harness.FakeTimer()
    widget.masking.ui = widget.ui
    widget.masking.select()
    monkeypatch.setattr(
        slicer,
        "modules",
        types.SimpleNamespace(
            fastsam3dslicer=types.SimpleNamespace(
                widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: widget)
            )
        ),
        raising=False,
    )
    ns.module, ns.widget, ns.red, ns.qt = module, widget, red, qt
    return ns
