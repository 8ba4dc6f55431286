"""The Lib's setup flow (setup_flow.py): the download -> load state machine the Widget's timer
polls, the load plan, the dependency report, the control rules, and the prompt markers
(markers.py) on real MRML. Qt-free: no stand-ins but a fake download task and engine."""

from __future__ import annotations

import logging
import threading
import types

import pytest

from FastSAM3DSlicerLib import backends, engine, interaction, markers, params, setup_flow


class FakeTask:
    """weights.DownloadTask's polled surface; the test finishes it."""

    def __init__(self, key: str) -> None:
        self.key, self.done, self.total = key, 0, None
        self.error, self.cancelled, self.cancels = None, False, 0
        self._finished = threading.Event()

    def start(self) -> FakeTask:
        return self

    def cancel(self) -> None:
        self.cancels += 1

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout=None) -> bool:
        return self._finished.wait(timeout)

    def finish(self, error=None, cancelled=False) -> None:
        self.error, self.cancelled = error, cancelled
        self._finished.set()


@pytest.fixture
def flow(monkeypatch):
    tasks = []

    def make(key):
        tasks.append(FakeTask(key))
        return tasks[-1]

    monkeypatch.setattr(setup_flow.weights, "DownloadTask", make)
    f = setup_flow.ModelSetup()
    f.tasks = tasks
    yield f
    f.shutdown()


def test_download_reports_progress_then_done_and_returns_to_idle(flow):
    assert flow.state == setup_flow.IDLE
    flow.start_download("fastsam3d")
    assert flow.state == setup_flow.DOWNLOADING
    with pytest.raises(RuntimeError, match="already running"):
        flow.start_download("fastsam3d")
    task = flow.tasks[0]
    pumps = []
    assert flow.poll_download(lambda: pumps.append(1), 0.05) == []  # no size known yet
    assert pumps and flow.state == setup_flow.DOWNLOADING
    task.done, task.total = 50, 200
    [event] = flow.poll_download(None, 0.0)
    assert (event.kind, event.done, event.total) == ("progress", 50, 200)
    task.done = 200
    task.finish()
    kinds = [e.kind for e in flow.poll_download(None, 0.0)]
    assert kinds == ["progress", "downloaded"] and flow.state == setup_flow.IDLE
    assert flow.poll_download(None, 0.0) == []


@pytest.mark.parametrize(
    ("error", "cancelled", "kind"),
    [(OSError("disk full"), False, "download_failed"), (None, True, "download_cancelled")],
)
def test_download_failure_and_cancel_end_the_download(flow, error, cancelled, kind):
    flow.start_download("fastsam3d")
    flow.cancel_download()
    assert flow.tasks[0].cancels == 1
    flow.tasks[0].finish(error, cancelled)
    [event] = flow.poll_download(None, 0.0)
    assert event.kind == kind and event.error is error and flow.state == setup_flow.IDLE


def test_load_runs_on_the_worker_and_hands_the_engine_back(flow, monkeypatch):
    gate, threads = threading.Event(), []

    def load(request):
        threads.append(threading.get_ident())
        gate.wait(10)
        return ("engine", request.weights)

    monkeypatch.setattr(setup_flow, "load_engine", load)
    flow.start_load(setup_flow.LoadRequest("local", "fastsam3d"))
    assert flow.state == setup_flow.LOADING
    with pytest.raises(RuntimeError, match="already loading"):
        flow.adopt(flow.worker.submit(lambda: None))
    assert flow.poll_load(None, 0.01) is None  # still loading
    gate.set()
    event = flow.poll_load(None, 10.0)
    assert event.kind == "loaded" and event.engine == ("engine", "fastsam3d")
    assert flow.state == setup_flow.IDLE and threads == [flow.worker.thread_id]
    assert flow.poll_load(None, 0.0) is None


def test_a_failed_load_is_an_event_with_the_error(flow, monkeypatch, caplog):
    def load(request):
        raise backends.BackendError("wrong API key")

    monkeypatch.setattr(setup_flow, "load_engine", load)
    flow.start_load(setup_flow.LoadRequest("remote", ""))
    with caplog.at_level(logging.ERROR):
        event = flow.poll_load(None, 10.0)
    assert event.kind == "load_failed" and "wrong API key" in str(event.error)
    assert flow.state == setup_flow.IDLE and "loading failed" in caplog.text


def test_shutdown_drops_the_load_and_cancels_the_download(flow):
    gate = threading.Event()
    flow.adopt(flow.ensure_worker().submit(gate.wait, 10))
    flow.start_download("fastsam3d")
    worker = flow.worker
    assert flow.shutdown(keep_worker=True) is True  # a load was dropped: restore the cursor
    assert flow.future is None and flow.tasks[0].cancels == 1 and worker.thread_id
    gate.set()
    assert flow.poll_load(None, 0.0) is None  # a dropped future reports nothing
    assert flow.shutdown() is False


def test_next_step_downloads_only_missing_registry_weights():
    def downloaded(key):
        return key == "fastsam3d"

    def step(kind, key):
        return setup_flow.next_step(setup_flow.LoadRequest(kind, key), downloaded)

    assert step("local", "fastsam3d") == setup_flow.LOAD
    assert step("local", "sam-med3d-turbo") == setup_flow.DOWNLOAD
    assert step("onnx", "sam-med3d-turbo") == setup_flow.DOWNLOAD
    assert step("local", engine.LOCAL_FILE) == setup_flow.LOAD  # a file of the user's
    assert step("remote", "") == setup_flow.LOAD  # the server's own model


def test_load_engine_picks_the_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(
        engine.FastSAM3DEngine, "load", staticmethod(lambda *a: calls.append(("local", a)))
    )
    monkeypatch.setattr(backends, "build_engine", lambda *a: calls.append(("other", a)))
    settings = backends.BackendSettings(kind=backends.REMOTE)
    setup_flow.load_engine(setup_flow.LoadRequest("local", "fastsam3d", "cpu", None))
    setup_flow.load_engine(setup_flow.LoadRequest("remote", "", "auto", None, settings))
    assert calls == [
        ("local", ("fastsam3d", "cpu", None)),
        ("other", (settings, "", "auto", None)),
    ]


def test_controls_cannot_swap_the_network_while_it_works():
    """Review m1, as a table: what each activity leaves enabled."""
    idle = setup_flow.enabled_controls(
        has_weights=True, loaded=True, busy=False, loading=False, downloading=False
    )
    assert all(idle.values())
    busy = setup_flow.enabled_controls(
        has_weights=True, loaded=True, busy=True, loading=False, downloading=False
    )
    assert {k for k, on in busy.items() if on} == {"downloadWeightsButton"}
    loading = setup_flow.enabled_controls(
        has_weights=True, loaded=False, busy=False, loading=True, downloading=False
    )
    assert {k for k, on in loading.items() if on} == {"downloadWeightsButton"}
    downloading = setup_flow.enabled_controls(
        has_weights=True, loaded=True, busy=False, loading=False, downloading=True
    )
    assert {k for k, on in downloading.items() if not on} == {
        "downloadWeightsButton",
        "removeWeightsButton",
        "loadModelButton",
        "weightsComboBox",
    }
    nothing = setup_flow.enabled_controls(
        has_weights=False, loaded=False, busy=False, loading=False, downloading=False
    )
    assert {k for k, on in nothing.items() if on} == {
        "loadModelButton",
        "weightsComboBox",
        "deviceComboBox",
        "backendComboBox",
    }


def test_dependency_report_names_what_each_backend_lacks(monkeypatch):
    need = {"local": [types.SimpleNamespace(text="torch>=2.1")], "remote": []}
    monkeypatch.setattr(backends, "missing", lambda kind: need[kind])
    monkeypatch.setattr(setup_flow.deps, "python39_note", lambda: "only .safetensors load")
    monkeypatch.setattr(engine, "ensure_fastsam3d_importable", lambda: None)
    local = setup_flow.dependency_report("local", "5.12")
    assert not local.ready and local.text() == "missing: torch>=2.1\nonly .safetensors load"
    remote = setup_flow.dependency_report("remote", "5.12")
    assert remote.ready and remote.text("ok") == "ok"  # no torch, no Python 3.9 note
    old = setup_flow.dependency_report("local", "5.6")
    assert old.problem and "5.8 or newer" in old.text() and not old.ready


def test_closing_an_engine_runs_off_the_main_thread_and_never_raises(caplog):
    closed = []
    thread = setup_flow.close_in_background(types.SimpleNamespace(close=lambda: closed.append(1)))
    thread.join(10)
    assert closed == [1] and thread.daemon

    def fail():
        raise ConnectionError("server gone")

    with caplog.at_level(logging.WARNING):
        setup_flow.close_in_background(types.SimpleNamespace(close=fail)).join(10)
    assert "could not close" in caplog.text
    assert setup_flow.close_in_background(object()) is None  # a local engine: nothing to end


# -- markers.py -----------------------------------------------------------------------------


def test_markers_show_points_and_the_box_and_take_them_away_by_tag(scene):
    m = markers.PromptMarkers(scene.scene)
    m.show_points(lambda: [])  # before the first prompt: nothing is created
    assert m.point_node is None
    world = tuple(scene.world_of_ijk((22, 20, 18)))
    positive = m.add(interaction.PointPrompt(world, True))
    negative = m.add(interaction.PointPrompt(world, False))
    node = m.point_node
    assert m.point_count() == 2 and positive != negative
    assert node.GetNthControlPointSelected(0) and not node.GetNthControlPointSelected(1)
    assert node.GetNthControlPointLocked(0) and not node.GetSaveWithScene()
    assert node.GetAttribute(markers.PROMPTS_ATTRIBUTE) == "1"
    m.remove(positive)
    assert m.point_count() == 1 and node.GetNthControlPointID(0) == negative
    m.remove(None)  # a refused box re-run: nothing to take away
    assert m.box() is None
    view = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetDimensions(400, 300, 1)
    view.SetFieldOfView(80.0, 60.0, 1.0)
    box = interaction.BoxPrompt(interaction.box_from_drag(view, (100, 100), (140, 130)))
    assert m.add(box) == markers.BOX_TAG and m.box() is m.box_node
    assert min(m.box_node.GetSize()) > 0  # a drawn box has depth
    m.remove(markers.BOX_TAG)
    assert m.box() is None and m.box_node.GetScene() is scene.scene  # hidden, kept


def test_markers_follow_the_selected_segment_and_forget_a_closed_scene(scene):
    m = markers.PromptMarkers(scene.scene)
    m.add(interaction.PointPrompt(tuple(scene.world_of_ijk((22, 20, 18))), True))
    prompts = [
        types.SimpleNamespace(kind="point", world=(1.0, 2.0, 3.0), positive=False, tag=None),
        types.SimpleNamespace(kind="box", world=None, positive=True, tag="box"),
    ]
    m.show_points(lambda: prompts)
    assert m.point_count() == 1 and prompts[0].tag == m.point_node.GetNthControlPointID(0)
    m.show_points(None)  # no network: no session, no points
    assert m.point_count() == 0
    m.forget()
    assert m.point_node is None and m.box_node is None


# -- params: the parameter node's choices ---------------------------------------------------


def test_preferences_seed_a_parameter_node_and_read_it_back():
    node = types.SimpleNamespace(weights="fastsam3d", device="auto", positive=True)
    params.Preferences("sam-med3d-turbo", "cpu", False).apply(node)
    assert (node.weights, node.device, node.positive) == ("sam-med3d-turbo", "cpu", False)
    assert params.Preferences.of(node) == params.Preferences("sam-med3d-turbo", "cpu", False)
    node.device, node.weights = "tpu", ""  # what a hand-edited scene file could hold
    assert params.Preferences.of(node) == params.Preferences("fastsam3d", "auto", False)
