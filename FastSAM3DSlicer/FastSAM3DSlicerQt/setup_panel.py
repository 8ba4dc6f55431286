"""The panel's Setup section: backend, dependencies, weights and model loading.

A mixin of ``FastSAM3DSlicerWidget`` (one panel, its slots in three files): the same object, so
every slot and attribute keeps its name on the Widget. Qt wiring only: what is missing, which
step comes next, the download and the load themselves are ``FastSAM3DSlicerLib.setup_flow``;
the backends are ``FastSAM3DSlicerLib.backends``. Nothing heavy at import (the module file
imports this at its top): the Lib is imported inside the methods.
"""

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


class SetupPanel:
    """The Setup section's slots; the Widget's ``__init__``/``setup`` create the state they use
    (``modelSetup``, ``backend``, ``_weightChoices``, ``logic``...)."""

    # -- backend: local PyTorch, local ONNX Runtime, remote server (Lib/backends.py) ------

    def _setupBackend(self) -> None:
        """The backend choice, from the user's settings; the key stays in memory unless
        "remember" is ticked (then in QSettings), never in the scene or a log."""
        from FastSAM3DSlicerLib import backends

        self.backend = backends.BackendSettings.load(qt.QSettings())
        usable, why = backends.onnx_status()
        combo = self.ui.backendComboBox
        combo.blockSignals(True)
        for key, label in backends.CHOICES:
            if key != backends.ONNX or usable:
                combo.addItem(_(label), key)
        if self.backend.kind == backends.ONNX and not usable:
            self.backend.kind = backends.LOCAL
        self._backendKeys = [k for k, _l in backends.CHOICES if k != backends.ONNX or usable]
        combo.setCurrentIndex(self._backendKeys.index(self.backend.kind))
        combo.blockSignals(False)
        combo.toolTip = _(
            "Where the network runs. Remote: a fastsam3d server (no PyTorch "
            "here). ONNX Runtime: this computer without PyTorch."
        ) + ("" if usable else "\n" + _("ONNX Runtime is not offered: ") + why)
        self.ui.serverUrlLineEdit.text = self.backend.url
        self.ui.apiKeyLineEdit.text = self.backend.api_key
        self.ui.rememberApiKeyCheckBox.checked = self.backend.remember_key
        for signal, action in (
            (combo.currentIndexChanged, self.onBackendChanged),
            (self.ui.serverUrlLineEdit.editingFinished, self.onServerSettingsChanged),
            (self.ui.apiKeyLineEdit.editingFinished, self.onServerSettingsChanged),
            (self.ui.rememberApiKeyCheckBox.toggled, self.onServerSettingsChanged),
            (self.ui.testConnectionButton.clicked, self.onTestConnection),
        ):
            signal.connect(self._guarded(action))
        self._showBackend()

    def _backendKind(self) -> str:
        return self.backend.kind if self.backend is not None else "local"

    def _backendMissing(self) -> list:
        """What the chosen backend needs and lacks: remote and ONNX never ask for torch."""
        from FastSAM3DSlicerLib import backends

        return backends.missing(self._backendKind())

    def _readBackendFields(self) -> None:
        from FastSAM3DSlicerLib import backends

        index = self.ui.backendComboBox.currentIndex
        keys = getattr(self, "_backendKeys", [k for k, _l in backends.CHOICES])
        self.backend.kind = keys[index] if 0 <= index < len(keys) else backends.LOCAL
        self.backend.url = str(self.ui.serverUrlLineEdit.text).strip()
        self.backend.api_key = str(self.ui.apiKeyLineEdit.text).strip()
        self.backend.remember_key = bool(self.ui.rememberApiKeyCheckBox.checked)
        self.backend.save(qt.QSettings())

    def onBackendChanged(self, index: Any = None) -> None:
        """Another backend: the loaded engine and its sessions no longer apply."""
        self._readBackendFields()
        self._dropEngine()
        self._showBackend()
        self._refreshDependencies()

    def onServerSettingsChanged(self, *args: Any) -> None:
        before = (self.backend.url, self.backend.api_key)
        self._readBackendFields()
        if self._backendKind() == "remote" and (self.backend.url, self.backend.api_key) != before:
            self._dropEngine()  # sessions live on the old server / under the old key

    def onTestConnection(self) -> Any:
        """Ask the server (on a thread, the UI pumped): model and device, or why not."""
        from FastSAM3DSlicerLib import backends, waiting

        self._readBackendFields()
        self.ui.testConnectionButton.enabled = False
        self.ui.backendStatusLabel.text = _("testing...")
        try:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                future = pool.submit(
                    backends.check_connection, self.backend.url, self.backend.api_key
                )
                waiting.wait_pumping(future, slicer.app.processEvents)
                report = future.result()
        except Exception as e:  # noqa: BLE001 - shown to the user
            report = backends.ConnectionReport(False, f"{type(e).__name__}: {e}")
        finally:
            self.ui.testConnectionButton.enabled = True
        self.ui.backendStatusLabel.text = report.message
        return report

    def _showBackend(self) -> None:
        remote = self._backendKind() == "remote"
        self.ui.remoteSettingsWidget.setVisible(remote)
        for w in (
            self.ui.weightsLabel,
            self.ui.weightsComboBox,
            self.ui.weightsStatusLabel,
            self.ui.weightsLicenseLabel,
            self.ui.downloadWeightsButton,
            self.ui.removeWeightsButton,
            self.ui.deviceSelectorLabel,
            self.ui.deviceComboBox,
        ):
            w.setVisible(not remote)
        if remote:  # shown again by _showWeightsStatus for "Local checkpoint file..."
            self.ui.localWeightsLabel.setVisible(False)
            self.ui.localWeightsPathLineEdit.setVisible(False)
        else:
            self.ui.backendStatusLabel.text = ""
            self._showWeightsStatus()

    def _closeEngine(self, eng: Any) -> None:
        """A remote engine ends its sessions on the server, on a daemon thread."""
        from FastSAM3DSlicerLib import setup_flow

        self._closingThread = setup_flow.close_in_background(eng)

    # -- setup: dependencies, weights, model (Lib setup_flow) ------------------------------

    def _refreshDependencies(self) -> bool:
        """Show what the chosen backend lacks; True when nothing is missing."""
        from FastSAM3DSlicerLib import setup_flow

        version = f"{slicer.app.majorVersion}.{slicer.app.minorVersion}"
        report = setup_flow.dependency_report(self._backendKind(), version)
        self.ui.installDependenciesButton.setVisible(
            report.problem is None and bool(report.missing)
        )
        if report.problem:  # a Slicer too old to run the module: say so, offer nothing
            self.ui.dependenciesStatusLabel.text = report.problem
            self.ui.loadModelButton.enabled = False
            return False
        if report.ready and self._backendKind() != "remote":  # a server has its own model
            self._refreshWeights()
        self.ui.dependenciesStatusLabel.text = report.text(_("installed"), _("missing: "))
        self._updateButtons()
        return not report.missing

    def onInstallDependencies(self, resuming: bool = False) -> bool:
        """The first-use install (FastSAM3DSlicerLib.install): one dialog; torch through the
        PyTorch extension in a background process, the UI live; a restart asked for, never
        silent; the rest through Slicer's pip helpers."""
        from FastSAM3DSlicerLib import install
        from FastSAM3DSlicerQt.install_host import SlicerInstallHost

        outcome = install.install_dependencies(
            SlicerInstallHost(), resuming=bool(resuming), missing=self._backendMissing
        )
        ok = self._refreshDependencies()
        return outcome == install.DONE and ok

    def _refreshWeights(self) -> None:
        if self._weightChoices:
            self._showWeightsStatus()
            return
        from FastSAM3DSlicerLib import weights

        try:
            self._weightChoices = weights.choices()
        except Exception as e:  # noqa: BLE001 - e.g. a broken fastsam3d: say it, do not raise
            logging.exception("FastSAM3D: listing the weights failed")
            self.ui.weightsStatusLabel.text = str(e)
            return
        from FastSAM3DSlicerLib import params

        self.ui.weightsComboBox.blockSignals(True)
        for c in self._weightChoices:
            self.ui.weightsComboBox.addItem(c.label, c.key)  # the label shown, the key as data
        self.ui.weightsComboBox.blockSignals(False)
        self._selectKey(self.ui.weightsComboBox, params.Preferences.of(self._choices()).weights)
        self._showWeightsStatus()

    def _selectedWeights(self) -> Any:
        index = self.ui.weightsComboBox.currentIndex
        return self._weightChoices[index] if 0 <= index < len(self._weightChoices) else None

    def onWeightsChanged(self, index: Any = None) -> None:
        """Another network was chosen: the loaded one and its sessions no longer apply."""
        self._showWeightsStatus()
        self._saveChoices()
        self._dropEngine()

    def onDeviceChanged(self, index: Any = None) -> None:
        self._saveChoices()
        self._dropEngine()

    # -- the user's choices: the parameter node and the panel, both ways ------------------

    @staticmethod
    def _selectKey(combo: Any, key: str) -> bool:
        """Select the item whose data is ``key``, without its signal; True if it changed.
        An unknown key (weights this Slicer does not list) leaves the combo as it is."""
        index = combo.findData(key)
        if index < 0 or index == combo.currentIndex:
            return False
        combo.blockSignals(True)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        return True

    def _showChoices(self) -> None:
        """The parameter node's choices in the panel (a scene loaded or imported over it, a
        new node after a scene close): the combos select its weights and device keys, the next
        point takes its polarity. Other weights or device drop the loaded network, as the
        user's own change does; the preferences keep the user's choices, not the scene's."""
        from FastSAM3DSlicerLib import params

        node = self._parameterNode
        if node is None or self._syncingChoices:
            return
        choices = params.Preferences.of(node)
        changed = [
            self._selectKey(self.ui.weightsComboBox, choices.weights),
            self._selectKey(self.ui.deviceComboBox, choices.device),
        ]
        if any(changed):
            self._showWeightsStatus()
            if self.logic is not None:
                self._dropEngine()
        if self.capture is not None and self.capture.positive != choices.positive:
            self.capture.positive = choices.positive
            self._showPolarity()
            self._applyCursors()

    def _saveChoices(self) -> None:
        """The panel's choices into the parameter node, and from it into the preferences."""
        from FastSAM3DSlicerLib import params

        choice = self._selectedWeights()
        device = self.ui.deviceComboBox.currentText
        positive = self.capture.positive
        node = self._choices()
        self._syncingChoices = True  # the node's Modified events: the panel is the source here
        try:
            if choice is not None:
                node.weights = choice.key
            if device in params.DEVICES:
                node.device = device
            node.positive = positive
        finally:
            self._syncingChoices = False
        params.Preferences.of(node).save(qt.QSettings())

    def _showWeightsStatus(self) -> None:
        from FastSAM3DSlicerLib import engine, weights

        choice = self._selectedWeights()
        if choice is None:
            return
        local = choice.key == engine.LOCAL_FILE
        self.ui.localWeightsPathLineEdit.setVisible(local)
        self.ui.localWeightsLabel.setVisible(local)
        self.ui.weightsLicenseLabel.text = choice.license_note
        self.ui.weightsStatusLabel.text = (
            choice.description if local else weights.status_text(choice.key)
        )
        self._updateButtons()

    def onDownloadWeights(self) -> None:
        from FastSAM3DSlicerLib import waiting, weights

        choice = self._selectedWeights()
        if choice is None or self.modelSetup.download is not None or self._probingSize:
            return
        # The size comes from a HEAD request on a thread; waiting for it GIL-free with the UI
        # pumped keeps Slicer responsive, and a slow DNS lookup cannot freeze it (m9).
        self._probingSize = True
        self.ui.downloadWeightsButton.enabled = False
        try:
            probe = weights.SizeProbe(choice.key).start()
            waiting.wait_pumping(probe, slicer.app.processEvents, timeout=weights.SIZE_TIMEOUT_S)
            size = probe.size
        finally:
            self._probingSize = False
            self._updateButtons()
        if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
            _("Download {label} ({size}) into your user cache?\n\n{license}").format(
                label=choice.label, size=weights.human_size(size), license=choice.license_note
            ),
            windowTitle=_("Download model"),
        ):
            return
        self.modelSetup.start_download(choice.key)
        self.ui.downloadProgressBar.setVisible(True)
        self.ui.cancelDownloadButton.setVisible(True)
        self.ui.downloadProgressBar.setMaximum(100)
        self.pollTimer.start()
        self._updateButtons()

    def _pollDownload(self) -> None:
        from FastSAM3DSlicerLib import waiting, weights

        for event in self.modelSetup.poll_download(
            slicer.app.processEvents, waiting.PROGRESS_EVERY_S
        ):
            if event.kind == "progress":
                self.ui.downloadProgressBar.setValue(int(100 * event.done / event.total))
                self.ui.downloadProgressBar.setFormat(f"%p% of {weights.human_size(event.total)}")
                continue
            self.ui.downloadProgressBar.setVisible(False)
            self.ui.cancelDownloadButton.setVisible(False)
            if event.kind == "download_failed":
                self._dropDeferred("")
                slicer.util.errorDisplay(_("Download failed: ") + str(event.error))
            elif event.kind == "download_cancelled":
                self._dropDeferred("")
                self.ui.statusLabel.text = _("Download cancelled; nothing was kept.")
            elif self.deferred:
                self.onLoadModel()  # prompts are waiting for this model
            self._showWeightsStatus()

    def onRemoveWeights(self) -> None:
        from FastSAM3DSlicerLib import engine, weights

        choice = self._selectedWeights()
        if choice is None or choice.key == engine.LOCAL_FILE:
            return
        if not slicer.util.confirmYesNoDisplay(
            _("Delete the downloaded {label} weights from your cache?").format(label=choice.label)
        ):
            return
        self._dropEngine()
        weights.remove(choice.key)
        self._showWeightsStatus()

    def _dropEngine(self, index: Any = None) -> None:
        """Forget the loaded network (new weights, device, backend or server) and every
        session; while it predicts, once the results are written (the timer's tick)."""
        if self.logic is not None and self.logic.busy:
            self._dropWhenIdle = True
            return
        self._dropWhenIdle = False
        self.markers.clear_points()  # their sessions (and undo) are gone
        if self.logic is not None:
            self._closeEngine(self.logic.engine)
            self.logic = None
            self.ui.deviceLabel.text = _("model not loaded")
            self.ui.cpuWarningLabel.setVisible(False)
        self._updateButtons()

    def onLoadModel(self) -> None:
        """Load the chosen network: the dependencies and the weights download first."""
        from FastSAM3DSlicerLib import setup_flow, weights

        if self.modelSetup.future is not None:
            return
        if not self._refreshDependencies() and not self.onInstallDependencies():
            return
        kind = self._backendKind()
        choice = self._selectedWeights()
        if choice is None and kind != "remote":
            return
        request = setup_flow.LoadRequest(
            kind,
            choice.key if choice is not None else "",
            self.ui.deviceComboBox.currentText,
            self.ui.localWeightsPathLineEdit.currentPath or None,
            self.backend,
        )
        if setup_flow.next_step(request, weights.is_downloaded) == setup_flow.DOWNLOAD:
            self.onDownloadWeights()
            self.ui.statusLabel.text = _("Load the model again once the download has finished.")
            return
        if self.logic is not None:
            self._dropEngine()  # sessions of the old network end here, with their markers
        # Loaded on the inference thread: the network's first CUDA work (and cuDNN's per-thread
        # caches) must happen where every later click runs.
        self.modelSetup.start_load(request)
        self.ui.deviceLabel.text = _("loading...")
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        self.pollTimer.start()
        self._updateButtons()

    def _pollEngine(self) -> None:
        from FastSAM3DSlicerLib import waiting
        from FastSAM3DSlicerLib.logic import InteractiveLogic

        event = self.modelSetup.poll_load(slicer.app.processEvents, waiting.PROGRESS_EVERY_S)
        if event is None:
            return
        qt.QApplication.restoreOverrideCursor()
        if event.kind == "load_failed":
            self.ui.deviceLabel.text = _("model not loaded")
            self._dropDeferred("")
            slicer.util.errorDisplay(_("Loading the model failed: ") + str(event.error))
            self._updateButtons()
            return
        eng = event.engine
        if self.logic is None:
            self.logic = InteractiveLogic(eng, self.modelSetup.ensure_worker())
        elif not self.logic.set_engine(eng):  # m1: predictions in flight finish first
            self._status(_("The new model is used once the running predictions are written."))
        self.ui.deviceLabel.text = f"{eng.device_info.description} [{eng.device}]"
        self.ui.cpuWarningLabel.setVisible(eng.device_info.is_cpu)
        self._updateButtons()
        self._runDeferred()
