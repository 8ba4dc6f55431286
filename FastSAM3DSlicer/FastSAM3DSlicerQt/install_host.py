"""FastSAM3DSlicerLib.install's view of the Slicer application (its ``InstallHost``): dialogs,
the extensions manager, Slicer's pip helpers and the event pump. The install flow itself is
Qt-free, in the Lib."""

from __future__ import annotations

import logging
from typing import Any

import qt
import slicer

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer without the i18n helpers

    def _(text: str) -> str:
        return text


class SlicerInstallHost:
    """FastSAM3DSlicerLib.install's view of Slicer (its InstallHost): dialogs, the extensions
    manager, Slicer's pip helpers, the event pump. The install flow itself is in the Lib."""

    def __init__(self) -> None:
        self.testing = slicer.app.testingEnabled()
        self.slicer_version = f"{slicer.app.majorVersion}.{slicer.app.minorVersion}"
        self.store = qt.QSettings()
        self._dialog = None

    def confirm(self, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("FastSAM3D setup"))

    def ask_restart(self, text: str) -> bool:
        return slicer.util.confirmYesNoDisplay(text, windowTitle=_("FastSAM3D setup"))

    def restart(self) -> None:
        slicer.util.restart()

    def error(self, text: str) -> None:
        logging.error(text)
        slicer.util.errorDisplay(text, windowTitle=_("FastSAM3D setup"))

    def info(self, text: str) -> None:
        slicer.util.infoDisplay(text, windowTitle=_("FastSAM3D setup"))

    def pytorch_utils(self) -> Any:
        try:
            import PyTorchUtils
        except ImportError:  # the PyTorch extension is missing, or installed but not loaded
            return None
        return PyTorchUtils

    def _manager(self) -> Any:
        return (
            slicer.app.extensionsManagerModel()
            if hasattr(slicer.app, "extensionsManagerModel")
            else None
        )

    def extension_installed(self, name: str) -> Any:
        manager = self._manager()
        if manager is None or not hasattr(manager, "isExtensionInstalled"):
            return None
        return bool(manager.isExtensionInstalled(name))

    def install_extension(self, name: str) -> bool:
        manager = self._manager()
        if manager is None or not hasattr(manager, "installExtensionFromServer"):
            return False
        return bool(manager.installExtensionFromServer(name, False))  # we ask for the restart

    def pip_install(self, requirements: list) -> None:
        from FastSAM3DSlicerLib import install

        with slicer.util.WaitCursor():
            install.pip_installer(slicer.util.pip_install)(requirements)

    def progress(self, text: str) -> bool:
        if self._dialog is None:
            self._dialog = slicer.util.createProgressDialog(
                maximum=0, windowTitle=_("FastSAM3D setup"), labelText=text
            )
        self._dialog.labelText = text
        return bool(self._dialog.wasCanceled)

    def pump(self) -> None:
        slicer.app.processEvents()

    def done_waiting(self) -> None:
        if self._dialog is not None:
            self._dialog.close()
            self._dialog = None
