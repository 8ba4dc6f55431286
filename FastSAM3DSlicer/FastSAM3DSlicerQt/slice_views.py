"""The slice views' side of prompting (Qt and VTK): event filters that hand mouse events to the
Widget, the polarity cursor and the live box outline. What an event means is decided by the
Widget's ``onViewEvent`` and the Lib's ``interaction.PromptCapture`` behind it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import qt
import slicer
import vtk

from FastSAM3DSlicerLib import interaction
from FastSAM3DSlicerLib.markers import NEGATIVE_COLOR, OUTLINE_COLOR, POSITIVE_COLOR


class SliceViewFilter(qt.QObject):
    """Hands one slice view's mouse events to the Widget (prompt capture and cursor)."""

    def __init__(self, onEvent: Callable[[Any, Any, Any], bool], sliceWidget: Any) -> None:
        qt.QObject.__init__(self)
        self.onEvent = onEvent
        self.sliceWidget = sliceWidget

    def eventFilter(self, obj: Any, event: Any) -> bool:
        try:
            return bool(self.onEvent(self.sliceWidget, obj, event))
        except Exception:  # noqa: BLE001 - an exception must not escape into Qt's event loop
            logging.exception("FastSAM3D: handling a view event failed")
            return False


def sliceWidgets() -> list:
    """The slice views of the current layout."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return []
    widgets = (layoutManager.sliceWidget(name) for name in layoutManager.sliceViewNames())
    return [w for w in widgets if w is not None]


class SliceViews:
    """The slice views' side of prompting: event filters, the polarity cursor, the box outline.

    ``handleEvent`` turns a view's mouse events into the Lib's ``PromptCapture`` calls and a
    finished prompt into ``onPrompt(prompt, viewVolumeID)``, called from the event loop (never
    inside the view's event handler: what follows may load a model or ask the user).
    """

    def __init__(
        self,
        onEvent: Callable[[Any, Any, Any], bool],
        onPrompt: Callable[[Any, Any], None],
        onStatus: Callable[[str], None],
    ) -> None:
        self.onEvent = onEvent
        self.onPrompt = onPrompt
        self.onStatus = onStatus
        self.filters = []  # (widget, SliceViewFilter) while the module is shown
        self.outline = None  # live box outline: (view, renderer, actor, points)
        self.cursors = {}

    def install(self) -> None:
        """Watch every slice view's mouse (the view widget and the VTK widgets inside it)."""
        for sliceWidget in sliceWidgets():
            view = sliceWidget.sliceView()
            for target in [view] + list(view.findChildren(qt.QWidget)):
                if any(target is t for t, _f in self.filters):
                    continue
                eventFilter = SliceViewFilter(self.onEvent, sliceWidget)
                target.installEventFilter(eventFilter)
                self.filters.append((target, eventFilter))

    def remove(self) -> None:
        for target, eventFilter in self.filters:
            try:
                target.removeEventFilter(eventFilter)
                target.unsetCursor()
            except (RuntimeError, ValueError, AttributeError):
                pass  # the view was deleted with its layout
        self.filters = []

    def setCursor(self, positive: Any) -> None:
        """The polarity cursor on every watched view, or (None) the views' own back."""
        for target, _f in self.filters:
            try:
                if positive is None:
                    target.unsetCursor()
                else:
                    target.setCursor(self.cursor(positive))
            except (RuntimeError, ValueError, AttributeError):
                pass

    def cursor(self, positive: bool) -> Any:
        """A crosshair in the polarity's colour with a +/- sign: what the next click adds."""
        if positive not in self.cursors:
            size, c = 32, 15
            pixmap = qt.QPixmap(size, size)
            pixmap.fill(qt.QColor(0, 0, 0, 0))
            painter = qt.QPainter(pixmap)
            color = qt.QColor.fromRgbF(*(POSITIVE_COLOR if positive else NEGATIVE_COLOR))
            pen = qt.QPen(color)
            pen.setWidth(2)
            painter.setPen(pen)
            for x0, y0, x1, y1 in (
                (c, 0, c, c - 4),
                (c, c + 4, c, 22),
                (0, c, c - 4, c),
                (c + 4, c, 22, c),
            ):
                painter.drawLine(x0, y0, x1, y1)
            painter.drawLine(22, 27, 31, 27)  # the sign, bottom right
            if positive:
                painter.drawLine(26, 23, 26, 31)
            painter.end()
            self.cursors[positive] = qt.QCursor(pixmap, c, c)
        return self.cursors[positive]

    def showOutline(self, view: Any, rect: tuple) -> None:
        """The box being dragged, drawn in the view's display pixels until the release."""
        if self.outline is not None and self.outline[0] is not view:
            self.hideOutline()
        if self.outline is None:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(5)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5)
            for n in range(5):
                lines.InsertCellPoint(n)
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(*OUTLINE_COLOR)
            actor.GetProperty().SetLineWidth(2)
            renderer = view.renderWindow().GetRenderers().GetFirstRenderer()
            renderer.AddActor2D(actor)
            self.outline = (view, renderer, actor, points)
        (x0, y0), (x1, y1) = rect
        points = self.outline[3]
        for n, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))):
            points.SetPoint(n, x, y, 0.0)
        points.Modified()
        view.scheduleRender()

    def hideOutline(self) -> None:
        if self.outline is None:
            return
        view, renderer, actor, _points = self.outline
        self.outline = None
        renderer.RemoveActor2D(actor)
        view.scheduleRender()

    def handleEvent(self, capture: Any, sliceWidget: Any, obj: Any, event: Any) -> bool:
        """A slice view's mouse event; True swallows it (only the left button, only prompting).

        Right-drag zoom, middle-drag pan, the wheel and modified clicks stay Slicer's.
        """
        kind = event.type()
        if not capture.active:
            return False
        if kind in (qt.QEvent.Enter, qt.QEvent.MouseMove):
            obj.setCursor(self.cursor(capture.positive))  # Slicer resets it on hover
        if kind not in (
            qt.QEvent.MouseButtonPress,
            qt.QEvent.MouseMove,
            qt.QEvent.MouseButtonRelease,
            qt.QEvent.MouseButtonDblClick,
        ):
            return False  # paint, wheel, keys...: the view's own
        left = qt.Qt.LeftButton
        view = sliceWidget.sliceView()
        key = sliceWidget.mrmlSliceNode().GetID()
        if kind == qt.QEvent.MouseButtonPress:
            modifiers = (
                qt.Qt.ShiftModifier | qt.Qt.ControlModifier | qt.Qt.AltModifier | qt.Qt.MetaModifier
            )
            if event.button() != left or (event.modifiers() & modifiers):
                return False  # Shift/Ctrl-clicks keep Slicer's meaning (crosshair...)
            xy, ratio = displayXY(view, obj, event)
            return capture.press(key, xy, ratio)
        if kind == qt.QEvent.MouseMove:
            if not capture.pressing:
                return False
            rect = capture.move(key, displayXY(view, obj, event)[0])
            if rect is not None:
                self.showOutline(view, rect)
            return True
        if kind == qt.QEvent.MouseButtonRelease and event.button() == left:
            if not capture.pressing:
                return False
            prompt = None
            try:
                prompt = capture.release(
                    key, displayXY(view, obj, event)[0], sliceWidget.mrmlSliceNode()
                )
            except ValueError as e:  # a box with no area
                self.onStatus(str(e))
            self.hideOutline()
            if prompt is not None:
                composite = sliceWidget.mrmlSliceCompositeNode()
                viewVolumeID = composite.GetBackgroundVolumeID() if composite else None
                qt.QTimer.singleShot(0, lambda: self.onPrompt(prompt, viewVolumeID))
            return True
        return kind == qt.QEvent.MouseButtonDblClick and event.button() == left


def displayXY(view: Any, obj: Any, event: Any) -> tuple:
    """The event's position in the view's display coordinates (VTK's, y up) and the pixel ratio."""
    pos = event.pos()
    if obj is not view:
        pos = obj.mapTo(view, pos)
    ratio = view.devicePixelRatioF() if hasattr(view, "devicePixelRatioF") else 1.0
    return interaction.display_xy(pos.x(), pos.y(), view.height, ratio), ratio


def firstViewVolumeID() -> Any:
    """The background volume of the first slice view that shows one."""
    for sliceWidget in sliceWidgets():
        composite = sliceWidget.mrmlSliceCompositeNode()
        if composite is not None and composite.GetBackgroundVolumeID():
            return composite.GetBackgroundVolumeID()
    return None
