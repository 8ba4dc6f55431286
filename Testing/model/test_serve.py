"""`fastsam3d serve` + RemoteSession on loopback: same masks and errors as a local session,
safety limits, eviction, concurrency and draining. A tiny fixture network keeps it fast."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import uvicorn

from fastsam3d import cli
from fastsam3d.bench import TINY
from fastsam3d.fastpath import Runner
from fastsam3d.remote import (
    RemoteEngine,
    RemoteError,
    RemoteSession,
    SessionExpiredError,
    check_server,
)
from fastsam3d.result import SessionError
from fastsam3d.serve import ServerConfig, create_app
from fastsam3d.session import Session
from fastsam3d.testing import fixture_model
from fastsam3d.volume import Volume, VolumeError

pytestmark = [
    pytest.mark.filterwarnings("ignore:fastsam3d. running on the CPU"),
    pytest.mark.timeout(120),
]

KEY = "test-key-0123456789abcdef"


def _runner() -> Runner:
    return Runner(fixture_model("fastsam3d", **TINY), "cpu")


@pytest.fixture(scope="module")
def runners() -> SimpleNamespace:
    """One Runner for the servers, a separate one (same weights) for the local references."""
    return SimpleNamespace(server=_runner(), local=_runner())


@contextlib.contextmanager
def serving(runner: Runner, **config: object) -> Iterator[SimpleNamespace]:
    """The app under uvicorn on a free loopback port, in a thread; stopped on exit."""
    config.setdefault("warmup", False)
    app = create_app(runner, ServerConfig(**config))
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=20
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}", port=port, server=server, app=app, thread=thread
        )
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def srv(runners: SimpleNamespace) -> Iterator[SimpleNamespace]:
    with serving(runners.server, api_key=KEY, max_sessions=8, max_upload_mb=4, warmup=True) as s:
        yield s


def _volume(shape=(40, 48, 56), dtype=np.float32, centre=(28, 24, 20)) -> Volume:
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d = np.sqrt((i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2)
    a = np.where(d < 12, 100.0 + i * 0.5, 0.0).astype(dtype)
    m = np.diag([1.0, 1.2, 2.0, 1.0])
    m[:3, 3] = [-20.0, 15.0, -40.0]
    return Volume(a, m)


def _same(a, b) -> None:
    assert a.region == b.region and a.shape == b.shape
    assert (a.crops, a.iou, a.at_crop_limit) == (b.crops, b.iou, b.at_crop_limit)
    np.testing.assert_array_equal(a.mask, b.mask)


def _steps(vol: Volume) -> list:
    c = vol.ijk_to_ras_points(np.array([28.0, 24.0, 20.0]))
    lo, hi = vol.ijk_to_ras_points([18.0, 14.0, 12.0]), vol.ijk_to_ras_points([38.0, 34.0, 28.0])
    return [
        lambda s: s.add_point(c),
        lambda s: s.add_point(c + [4.0, 0, 0], False),
        lambda s: s.add_point(c - [0, 5.0, 2.0]),
        lambda s: s.undo(),
        lambda s: s.add_box(lo, hi),
        lambda s: s.add_point((lo + hi) / 2 + 1.0),
        lambda s: s.undo(),
        lambda s: s.undo(),
        lambda s: s.reset(),
    ]


def _local(runners: SimpleNamespace, **kw: object) -> Session:
    return Session(runners.local, warmup=False, **kw)


# --- identical results --------------------------------------------------------------------
def test_remote_and_local_sessions_give_identical_results(srv, runners) -> None:
    vols = [
        _volume(),
        _volume(dtype=np.int16, centre=(20, 30, 18)).like(
            _volume(dtype=np.int16, centre=(20, 30, 18)).array.astype(">i2")
        ),
    ]
    # small chunks: the volume travels in several requests (430 KB float32 -> 7 chunks)
    with RemoteSession(srv.url, api_key=KEY, chunk_bytes=2**16) as remote:
        local = _local(runners)
        for vol in vols:  # the second volume replaces the first in the same session
            remote.set_volume(vol)
            local.set_volume(vol)
            assert remote.result is None and not remote.can_undo
            for step in _steps(vol):
                a, b = step(remote), step(local)
                _same(a, b)
                assert remote.can_undo == local.can_undo
                _same(remote.result, local.result)
            np.testing.assert_array_equal(remote.result.full_mask(), local.result.full_mask())


def test_session_options_reach_the_server(srv, runners) -> None:
    vol = _volume()
    opts = dict(
        point_policy="accumulate",
        max_crops=2,
        propagate=False,
        paste_interpolation="linear",
        lattice_anchor="corner",
    )
    with RemoteSession(srv.url, api_key=KEY, **opts) as remote:
        assert remote.ping()["point_policy"] == "accumulate"
        local = _local(runners, **opts)
        remote.set_volume(vol)
        local.set_volume(vol)
        for step in _steps(vol)[:3]:
            _same(step(remote), step(local))


# --- the same errors as locally -----------------------------------------------------------
def _error(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def test_bad_prompts_get_the_local_errors(srv, runners) -> None:
    vol = _volume()
    c = vol.ijk_to_ras_points(np.array([28.0, 24.0, 20.0]))
    with RemoteSession(srv.url, api_key=KEY) as remote:
        local = _local(runners)
        for s in (remote, local):  # before any volume
            assert _error(lambda s=s: s.add_point(c)) == (
                SessionError,
                "no volume: call set_volume(volume) first",
            )
        flat = Volume(np.full((8, 8, 8), 3.0, np.float32), np.eye(4))
        assert _error(lambda: remote.set_volume(flat)) == _error(lambda: local.set_volume(flat))
        assert _error(lambda: remote.set_volume(flat))[0] is VolumeError
        assert _error(lambda: remote.set_volume("x")) == _error(lambda: local.set_volume("x"))
        remote.set_volume(vol)
        local.set_volume(vol)
        bad = [
            lambda s: s.add_point([1e4, 0.0, 0.0]),
            lambda s: s.add_point([float("nan"), 0.0, 0.0]),
            lambda s: s.add_point([1.0, 2.0]),
            lambda s: s.add_box(c + 5, c - 5),
            lambda s: s.add_box(c + 1e4, c + 2e4),
            lambda s: s.undo(),
        ]
        for fn in bad:
            r, lo = _error(lambda fn=fn: fn(remote)), _error(lambda fn=fn: fn(local))
            assert r[0] is SessionError and lo[0] is SessionError
            assert r[1].replace("[", "(").replace("]", ")") == lo[1].replace("[", "(").replace(
                "]", ")"
            )
        # nothing changed: the next good click still matches
        _same(remote.add_point(c), local.add_point(c))


def _raw(
    srv,
    method: str,
    path: str,
    body: bytes | None = None,
    key: str | None = KEY,
    headers: dict | None = None,
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data else {})


def test_malformed_payloads_unknown_sessions_and_keys(srv) -> None:
    st, body = _raw(
        srv, "POST", "/v1/sessions", b"{not json", headers={"Content-Type": "application/json"}
    )
    assert st == 422 and body["error"] == "malformed"
    for field in ("model", "checkpoint", "path"):
        st, body = _raw(
            srv,
            "POST",
            "/v1/sessions",
            json.dumps({field: "/etc/passwd"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert st == 422 and field in body["message"] and "cannot name them" in body["message"]
    st, body = _raw(
        srv,
        "POST",
        "/v1/sessions",
        json.dumps({"max_crops": 99}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert st == 422 and "server's limit 8" in body["message"]
    st, body = _raw(
        srv,
        "POST",
        "/v1/sessions/nope/points",
        b'{"ras": [0, 0, 0]}',
        headers={"Content-Type": "application/json"},
    )
    assert (st, body["error"]) == (404, "unknown_session")
    with RemoteSession(srv.url, api_key=KEY) as remote:
        p = f"/v1/sessions/{remote.id}"
        js = {"Content-Type": "application/json"}
        st, body = _raw(srv, "POST", p + "/points", b'{"ras": "here"}', headers=js)
        assert st == 422 and "ras" in body["message"]
        st, body = _raw(srv, "PUT", p + "/volume/chunks/0", b"xx")
        assert st == 422 and "POST the volume header first" in body["message"]
        hdr = {
            "shape": [40, 48, 56],
            "dtype": "<f4",
            "ijk_to_ras": np.eye(4).tolist(),
            "codec": "zlib",
            "chunk_bytes": 2**16,
        }
        st, body = _raw(
            srv, "POST", p + "/volume", json.dumps({**hdr, "dtype": "<c16"}).encode(), headers=js
        )
        assert st == 422 and "dtype" in body["message"]
        st, body = _raw(srv, "POST", p + "/volume", json.dumps(hdr).encode(), headers=js)
        assert st == 200 and body["chunks"] == 7
        st, body = _raw(srv, "PUT", p + "/volume/chunks/0", b"garbage")
        assert st == 422 and "cannot decompress" in body["message"]
        st, body = _raw(srv, "PUT", p + "/volume/chunks/9", b"garbage")
        assert st == 422 and "out of range" in body["message"]
        st, body = _raw(srv, "POST", p + "/volume/commit", b"{}", headers=js)
        assert st == 422 and "upload incomplete" in body["message"]
        # geometry the server's Volume refuses arrives as the local VolumeError
        m = np.eye(4)
        m[:3, 2] = m[:3, 0]
        array = _volume().array
        bad = Volume.__new__(Volume)  # skips the client-side checks, as a foreign client would
        bad.array, bad.ijk_to_ras = array, m
        assert _error(lambda: remote.set_volume(bad)) == _error(lambda: Volume(array, m))
        assert _error(lambda: Volume(array, m))[0] is VolumeError
    # wrong or missing key
    for key in ("wrong-key-0123456789", None):
        with pytest.raises(RemoteError) as info:
            RemoteSession(srv.url, api_key=key or "")
        assert info.value.status == 401 and "API key" in str(info.value)
    assert _raw(srv, "GET", "/healthz", key=None) == (200, {"status": "ok"})
    st, body = _raw(srv, "GET", "/readyz", key=None)
    assert st == 200 and body["status"] == "ready"
    assert check_server(srv.url, api_key=KEY)["max_sessions"] == 8
    with pytest.raises(RemoteError, match="API key"):
        check_server(srv.url, api_key="wrong-key-0123456789")
    st, spec = _raw(srv, "GET", "/openapi.json", key=None)
    assert st == 200 and "/v1/sessions/{sid}/points" in spec["paths"]


def test_limits_give_clear_http_errors(runners) -> None:
    with serving(runners.server, max_sessions=2, max_upload_mb=0.25, instance="gpu3") as srv:
        a, b = RemoteSession(srv.url), RemoteSession(srv.url)
        assert a.id.startswith("gpu3.")  # a load balancer routes by this prefix
        with pytest.raises(RemoteError) as info:
            RemoteSession(srv.url)
        assert info.value.status == 503 and "maximum of 2 sessions" in str(info.value)
        st, body = _raw(srv, "GET", "/readyz", key=None)
        assert (st, body["status"]) == (503, "full")
        small = _volume(shape=(20, 24, 28))
        a.set_volume(small)
        before = a.add_point(small.ijk_to_ras_points(np.array([14.0, 12.0, 10.0])))
        with pytest.raises(RemoteError) as info:
            a.set_volume(_volume())  # 430 KB > 0.25 MB
        assert info.value.status == 413
        assert "exceeds the server's upload limit of 0.25 MB" in str(info.value)
        assert a.volume is small and a.undo().shape == before.shape  # the old volume is kept
        st, body = _raw(
            srv,
            "POST",
            f"/v1/sessions/{a.id}/points",
            b"x" * 100_000,
            key=None,
            headers={"Content-Type": "application/json"},
        )
        assert (st, body["error"]) == (413, "too_large")
        # the same without Content-Length (chunked transfer): counted as it arrives
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request(
            "POST",
            f"/v1/sessions/{a.id}/points",
            body=iter([b"x" * 50_000] * 2),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"] == "too_large"
        conn.close()
        b.close()
        RemoteSession(srv.url).close()  # room again
        a.close()


def test_idle_sessions_are_evicted_with_a_clear_error(runners) -> None:
    with serving(runners.server, idle_timeout_s=0.2) as srv:
        remote = RemoteSession(srv.url)
        time.sleep(0.8)
        with pytest.raises(SessionExpiredError, match="without requests.*idle timeout"):
            remote.set_volume(_volume(shape=(8, 8, 8)))
        remote.close()  # closing an expired session is quiet


# --- concurrency --------------------------------------------------------------------------
def test_concurrent_sessions_and_clicks_never_corrupt_state(srv, runners) -> None:
    vols = [_volume(), _volume(centre=(20, 30, 18))]
    expected = []
    for vol in vols:
        local = _local(runners)
        local.set_volume(vol)
        expected.append([step(local) for step in _steps(vol)[:5]])
    failures: list[str] = []

    def user(n: int) -> None:
        try:
            with RemoteSession(srv.url, api_key=KEY) as remote:
                vol = vols[n % 2]
                remote.set_volume(vol)
                for step, want in zip(_steps(vol), expected[n % 2]):
                    _same(step(remote), want)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"user {n}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not failures, failures

    # one session, clicks sent at once over separate connections: serialised, none lost
    with RemoteSession(srv.url, api_key=KEY) as remote:
        vol = vols[0]
        remote.set_volume(vol)
        c = vol.ijk_to_ras_points(np.array([28.0, 24.0, 20.0]))
        body = json.dumps({"ras": c.tolist(), "positive": True}).encode()
        codes: list[int] = []
        clicks = [
            threading.Thread(
                target=lambda: codes.append(
                    _raw(
                        srv,
                        "POST",
                        f"/v1/sessions/{remote.id}/points",
                        body,
                        headers={"Content-Type": "application/json"},
                    )[0]
                )
            )
            for _ in range(5)
        ]
        for t in clicks:
            t.start()
        for t in clicks:
            t.join(60)
        assert codes == [200] * 5
        # none was lost: a sixth click continues from five (each feeds its logits to the next)
        local = _local(runners)
        local.set_volume(vol)
        for _ in range(6):
            want = local.add_point(c)
        _same(remote.add_point(c), want)
        for _ in range(6):
            remote.undo()
        assert not remote.can_undo
        with pytest.raises(SessionError, match="nothing to undo"):
            remote.undo()


def test_shutdown_drains_clicks_in_flight(runners, monkeypatch) -> None:
    original = Session.add_point

    def slow(self, *a, **kw):
        time.sleep(0.4)
        return original(self, *a, **kw)

    vol = _volume()
    c = vol.ijk_to_ras_points(np.array([28.0, 24.0, 20.0]))
    local = _local(runners)
    local.set_volume(vol)
    want = local.add_point(c)
    with serving(runners.server) as srv:
        sessions = [RemoteSession(srv.url) for _ in range(3)]
        for s in sessions:
            s.set_volume(vol)
        monkeypatch.setattr(Session, "add_point", slow)
        got: list = []
        threads = [
            threading.Thread(target=lambda s=s: got.append(s.add_point(c))) for s in sessions
        ]
        for t in threads:
            t.start()
        time.sleep(0.2)  # all three are in flight (one running, two queued)
        srv.server.should_exit = True
        for t in threads:
            t.join(30)
        srv.thread.join(30)
        assert not srv.thread.is_alive()
        assert len(got) == 3
        for r in got:
            _same(r, want)
        with pytest.raises(RemoteError, match="cannot reach"):
            RemoteSession(srv.url)


# --- safety: logs and the command line ----------------------------------------------------
def test_logs_hold_no_image_data_or_usable_ids(srv, caplog) -> None:
    vol = _volume()
    with caplog.at_level(logging.DEBUG, logger="fastsam3d"):
        with RemoteSession(srv.url, api_key=KEY) as remote:
            remote.set_volume(vol)
            remote.add_point(vol.ijk_to_ras_points(np.array([28.0, 24.0, 20.0])))
            sid = remote.id
    text = [r.getMessage() for r in caplog.records if r.name.startswith("fastsam3d")]
    assert any("volume" in t for t in text) and any("created" in t for t in text)
    assert all(len(t) < 300 for t in text)
    assert not any(sid in t for t in text)
    assert not any(KEY in t for t in text)


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("gpu-host", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    from fastsam3d.commands.serve import is_loopback

    assert is_loopback(host) is loopback


def test_serve_refuses_to_expose_itself_without_a_key(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FASTSAM3D_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--fixture-weights"]) == 2
    assert "without an API key" in capsys.readouterr().err
    short = tmp_path / "key"
    short.write_text("abc\n")
    assert cli.main(["serve", "--api-key-file", str(short), "--fixture-weights"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert cli.main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_segment_command_on_a_server(srv, runners, tmp_path) -> None:
    pytest.importorskip("SimpleITK")
    vol = _volume()
    vol.write(tmp_path / "img.nii.gz")
    img = Volume.read(tmp_path / "img.nii.gz")
    c = img.ijk_to_ras_points(np.array([28.0, 24.0, 20.0]))
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    out = tmp_path / "mask.nii.gz"
    rc = cli.main(
        [
            "segment",
            str(tmp_path / "img.nii.gz"),
            "--point",
            ",".join(f"{x:.6f}" for x in c),
            "--out",
            str(out),
            "--server",
            srv.url,
            "--api-key-file",
            str(keyfile),
            "-q",
        ]
    )
    assert rc == 0
    local = _local(runners)
    local.set_volume(img)
    want = local.add_point([float(f"{x:.6f}") for x in c]).full_mask()
    np.testing.assert_array_equal(Volume.read(out).array > 0, want)
    assert srv.app.state.manager.stats()["sessions"] == 0  # the command closed its session


def test_a_failing_job_is_a_clear_500_and_the_session_goes_on(srv, runners, monkeypatch) -> None:
    vol = _volume()
    c = vol.ijk_to_ras_points(np.array([28.0, 24.0, 20.0]))
    with RemoteSession(srv.url, api_key=KEY) as remote:
        remote.set_volume(vol)
        first = remote.add_point(c)

        def boom(self, *a, **kw):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(Session, "add_point", boom)
        with pytest.raises(RemoteError) as info:
            remote.add_point(c)
        assert info.value.status == 500 and "CUDA out of memory" in str(info.value)
        monkeypatch.undo()
        _same(remote.undo(), _local_undo_of_one_click(runners, vol, c))
        assert first.voxels > 0


def _local_undo_of_one_click(runners, vol, c):
    local = _local(runners)
    local.set_volume(vol)
    local.add_point(c)
    return local.undo()


def test_remote_engine_is_the_slicer_engine_interface(srv) -> None:
    with pytest.raises(RemoteError, match="API key"):
        RemoteEngine(srv.url, api_key="wrong-key-0123456789")
    engine = RemoteEngine(srv.url, api_key=KEY, max_crops=2)
    assert engine.device == "cpu on 127.0.0.1"
    vol = _volume()
    sessions = [engine.new_session() for _ in range(2)]
    for s in sessions:
        s.set_volume(engine.make_volume(vol.array, vol.ijk_to_ras))
        assert s.ping()["max_crops"] == 2
    assert srv.app.state.manager.stats()["sessions"] == 2
    engine.close()
    assert srv.app.state.manager.stats()["sessions"] == 0


def test_serve_command_loads_weights_through_segments_rules():
    """`fastsam3d serve` builds its network with `segment`'s loader: a regression test for the
    namespace it passes (it lacked the `--backend` choice the loader reads)."""
    import argparse

    from fastsam3d.commands import serve as serve_command
    from fastsam3d.modeling.sam3d import Sam3D

    messages: list = []
    model, name = serve_command._model(
        argparse.Namespace(model="fastsam3d", fixture_weights=True), messages.append
    )
    assert isinstance(model, Sam3D)
    assert name == "fastsam3d (fixture weights)"
    assert any("FIXTURE" in m for m in messages)


def test_serve_takes_a_registered_name_over_a_file_of_that_name(tmp_path, monkeypatch):
    """`fastsam3d serve --model fastsam3d` beside a file named `fastsam3d` served that file;
    a registered name always means the registry entry (README, load_model); a path is a file."""
    import argparse

    from fastsam3d.commands import segment
    from fastsam3d.commands import serve as serve_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fastsam3d").write_bytes(b"not the registered weights")
    (tmp_path / "mine.pth").write_bytes(b"a checkpoint file")
    monkeypatch.setattr(segment, "load_network", lambda ns, log: ns)
    for model, checkpoint, name in (
        ("fastsam3d", None, "fastsam3d"),
        ("./fastsam3d", "./fastsam3d", "fastsam3d"),
        ("mine.pth", "mine.pth", "mine.pth"),
    ):
        ns, got = serve_command._model(
            argparse.Namespace(model=model, fixture_weights=False), print
        )
        assert (ns.checkpoint, got) == (checkpoint, name), model
