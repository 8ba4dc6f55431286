"""Weights download and cache, against a loopback HTTP server: a user must never end up with a
partial or unverified checkpoint at the path that ``load_model`` reads."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.server
import json
import os
import struct
import threading
from pathlib import Path

import pytest

from fastsam3d import cli, hub, transfer, weights
from fastsam3d.commands import download as download_cmd
from fastsam3d.commands import info as info_cmd

CHUNK = 4096  # small stream chunks so that a 40 KiB body spans several reads


def checkpoint_bytes(payload: bytes) -> bytes:
    """A valid safetensors file holding ``payload`` as one uint8 tensor (downloads are checked
    to be checkpoints before they are kept)."""
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + payload


BODY = checkpoint_bytes(bytes((i * 7 + i // 251) % 256 for i in range(40_000)))
BODY_SHA = hashlib.sha256(BODY).hexdigest()
OTHER = checkpoint_bytes(b"another checkpoint" * 1000)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (mode, body)``; counts requests per path."""

    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a handler thread for long

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
        mode, body = srv.routes.get(self.path, ("404", b""))
        if mode == "404":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header(
            "Content-Type", "text/html" if mode == "html" else "application/octet-stream"
        )
        if mode == "chunked-drop":
            # Chunked body whose connection closes before the terminating zero-size chunk.
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = body[: len(body) // 2]
            self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "stall":
            # Send a little, then go silent until the test ends (a hung server or network).
            self.wfile.write(body[:100])
            self.wfile.flush()
            srv.stop.wait(10)
            self.close_connection = True
            return
        if mode == "short":
            # Announce the full length, send 60 %, hang up.
            self.wfile.write(body[: len(body) * 6 // 10])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes = {}
    srv.hits = {}
    srv.stop = threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    # Bound the server's life even if a test hangs: it shuts itself down after 120 s.
    watchdog = threading.Timer(120, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(hub.ENV_CACHE, str(d))
    monkeypatch.setattr(transfer, "_CHUNK", CHUNK)
    return d


@pytest.fixture
def registry_url(server, monkeypatch):
    """Point the registry entry "fastsam3d" at the loopback server."""
    info = dataclasses.replace(
        weights.get_weights("fastsam3d"), url=f"{server.url}/w/FastSAM3D.pth"
    )
    monkeypatch.setitem(weights.WEIGHTS, "fastsam3d", info)
    return "/w/FastSAM3D.pth"


def _leftovers(directory: Path) -> list[str]:
    """Files other than the record machinery: partial downloads would show up here."""
    if not directory.exists():
        return []
    return sorted(
        p.name
        for p in directory.rglob("*")
        if p.is_file() and p.name not in ("hashes.json", ".hashes.lock")
    )


def url_dir(directory: Path, url: str) -> Path:
    """Where a URL's download lives: its own folder, never a registry name's file."""
    return directory / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _records(directory: Path) -> dict:
    path = directory / hub.HASHES_FILE
    return json.loads(path.read_text(encoding="utf-8"))["files"] if path.exists() else {}


# ---------------------------------------------------------------------------------------------
# registry and cache location


def test_registry_entries_and_unknown_name():
    names = {w.name: w for w in weights.list_weights()}
    assert names["fastsam3d"].url.endswith("/techlove/FastSAM3D/resolve/main/FastSAM3D.pth")
    assert names["fastsam3d"].config == "fastsam3d"
    assert names["sam-med3d-turbo"].filename == "sam_med3d_turbo.pth"
    assert names["sam-med3d-turbo"].config == "sam-med3d-turbo"
    with pytest.raises(ValueError, match="fastsam3d, sam-med3d-turbo"):
        weights.get_weights("fastsam")


def test_hub_keeps_the_registry_names_callers_import_from_it():
    """Code written against the old hub (WeightsInfo, list_weights, get_weights_info) works."""
    assert hub.WeightsInfo is weights.WeightsInfo
    assert hub.list_weights() == weights.list_weights()
    with pytest.warns(DeprecationWarning, match="fastsam3d.get_weights"):
        assert hub.get_weights_info("fastsam3d") is weights.WEIGHTS["fastsam3d"]


def test_a_weights_entry_must_name_a_registered_config():
    entry = weights.WEIGHTS["fastsam3d"]
    with pytest.raises(ValueError, match="'fastsam3d-v2', which is not registered"):
        dataclasses.replace(entry, config="fastsam3d-v2")


def test_cache_dir_env_override_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "mine"))
    assert hub.cache_dir(create=False) == tmp_path / "mine"
    assert not (tmp_path / "mine").exists()
    assert hub.cache_dir().is_dir()
    monkeypatch.delenv(hub.ENV_CACHE)
    if os.name != "nt":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert hub.cache_dir(create=False) == tmp_path / "xdg" / "fastsam3d"
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert hub.cache_dir(create=False) == tmp_path / "home" / ".cache" / "fastsam3d"


def test_normalize_sha256():
    assert hub.normalize_sha256("SHA256:" + BODY_SHA.upper()) == BODY_SHA
    for bad in ("", "abc", BODY_SHA[:-1] + "g", BODY_SHA + "0"):
        with pytest.raises(ValueError, match="SHA-256"):
            hub.normalize_sha256(bad)


# ---------------------------------------------------------------------------------------------
# downloads


def test_good_download_records_hash_and_reuses(server, cache, registry_url):
    server.routes[registry_url] = ("ok", BODY)
    path = hub.download("fastsam3d", progress=False)
    assert path == cache / "FastSAM3D.pth"
    assert path.read_bytes() == BODY
    rec = _records(cache)["FastSAM3D.pth"]
    assert rec["sha256"] == BODY_SHA and rec["size"] == len(BODY) and not rec["pinned"]
    assert _leftovers(cache) == ["FastSAM3D.pth"]
    # Reuse: verified from the record, no second request.
    assert hub.download("fastsam3d", progress=False) == path
    assert hub.cached_path("fastsam3d") == path
    assert server.hits[registry_url] == 1
    assert hub.cache_status("fastsam3d", verify=True).verified is True


def test_url_download_and_progress_callback_totals(server, cache):
    server.routes["/x/model.pth"] = ("ok", BODY)
    seen = []
    path = hub.download(
        f"{server.url}/x/model.pth",
        progress=False,
        progress_callback=lambda done, total: seen.append((done, total)),
    )
    assert path == url_dir(cache, f"{server.url}/x/model.pth") / "model.pth"
    assert path.read_bytes() == BODY
    assert seen[0] == (0, len(BODY)) and seen[-1] == (len(BODY), len(BODY))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 3


def test_file_url_for_offline_installs(cache, tmp_path):
    src = tmp_path / "share" / "FastSAM3D.pth"
    src.parent.mkdir()
    src.write_bytes(BODY)
    path = hub.download(src.as_uri(), sha256=BODY_SHA, progress=False)
    assert path == url_dir(cache, src.as_uri()) / "FastSAM3D.pth" and path.read_bytes() == BODY
    assert src.read_bytes() == BODY  # the source is copied, never moved


@pytest.mark.parametrize("mode", ["short", "chunked-drop", "404"])
@pytest.mark.parametrize("with_callback", [False, True])
def test_failed_transfer_leaves_nothing(server, cache, registry_url, mode, with_callback):
    server.routes[registry_url] = (mode, BODY)
    cb = (lambda d, t: None) if with_callback else None
    with pytest.raises(hub.DownloadError) as exc:
        hub.download("fastsam3d", progress=False, progress_callback=cb)
    if mode == "short":
        assert f"of {len(BODY)} bytes" in str(exc.value)
    assert _leftovers(cache) == []
    assert _records(cache) == {}
    assert hub.cached_path("fastsam3d") is None


def test_stalled_server_times_out(server, cache, registry_url, monkeypatch):
    server.routes[registry_url] = ("stall", BODY)
    monkeypatch.setattr(transfer, "_TIMEOUT_S", 0.3)
    with pytest.raises(hub.DownloadError, match="timed out"):
        hub.download("fastsam3d", progress=False)
    assert _leftovers(cache) == [] and _records(cache) == {}


def test_wrong_pinned_hash_is_discarded(server, cache, registry_url):
    server.routes[registry_url] = ("ok", BODY)
    with pytest.raises(hub.ChecksumError, match="pinned"):
        hub.download("fastsam3d", sha256="0" * 64, progress=False)
    assert _leftovers(cache) == [] and _records(cache) == {}
    # The right pin is accepted and marked as pinned.
    path = hub.download("fastsam3d", sha256=BODY_SHA.upper(), progress=False)
    assert path.read_bytes() == BODY and _records(cache)["FastSAM3D.pth"]["pinned"]


def test_registry_pin_is_enforced(server, cache, registry_url, monkeypatch):
    server.routes[registry_url] = ("ok", BODY)
    pinned = dataclasses.replace(weights.get_weights("fastsam3d"), sha256="1" * 64)
    monkeypatch.setitem(weights.WEIGHTS, "fastsam3d", pinned)
    with pytest.raises(hub.ChecksumError):
        hub.download("fastsam3d", progress=False)
    assert _leftovers(cache) == []
    with pytest.raises(ValueError, match="conflicts"):
        hub.download("fastsam3d", sha256=BODY_SHA, progress=False)


@pytest.mark.parametrize("same_size", [True, False])
def test_tampered_file_is_refused(server, cache, registry_url, same_size):
    server.routes[registry_url] = ("ok", BODY)
    path = hub.download("fastsam3d", progress=False)
    data = bytearray(BODY)
    data[1234] ^= 0xFF
    path.write_bytes(bytes(data) if same_size else bytes(data[:-10]))
    with pytest.raises(hub.ChecksumError, match="--force"):
        hub.cached_path("fastsam3d", verify=True)
    with pytest.raises(hub.ChecksumError):
        hub.download("fastsam3d", progress=False)  # no silent re-download over it
    assert hub.cache_status("fastsam3d", verify=True).verified is False
    assert hub.cached_path("fastsam3d", verify=False) == path
    # force fetches a good copy and the record still matches it.
    assert hub.download("fastsam3d", progress=False, force=True).read_bytes() == BODY
    assert hub.cached_path("fastsam3d") == path


@pytest.mark.parametrize("failure", ["short", "chunked-drop", "wrong-pin", "cancel"])
def test_failing_forced_redownload_keeps_good_file(server, cache, registry_url, failure):
    server.routes[registry_url] = ("ok", BODY)
    path = hub.download("fastsam3d", progress=False)
    record = _records(cache)
    kwargs = {}
    if failure == "wrong-pin":
        server.routes[registry_url] = ("ok", OTHER)
        kwargs["sha256"] = BODY_SHA  # the server now serves something else
    elif failure == "cancel":
        kwargs["progress_callback"] = lambda done, total: done < 3 * CHUNK
    else:
        server.routes[registry_url] = (failure, OTHER)
    with pytest.raises(hub.HubError):
        hub.download("fastsam3d", progress=False, force=True, **kwargs)
    assert path.read_bytes() == BODY
    assert _records(cache) == record
    assert _leftovers(cache) == ["FastSAM3D.pth"]
    assert hub.cached_path("fastsam3d") == path


def test_pin_replaces_other_existing_file_and_upstream_change_warns(server, cache, registry_url):
    server.routes[registry_url] = ("ok", BODY)
    path = hub.download("fastsam3d", progress=False)
    server.routes[registry_url] = ("ok", OTHER)
    other_sha = hashlib.sha256(OTHER).hexdigest()
    # The cached file is not the pinned one: fetched again (no force needed), then replaced.
    assert hub.download("fastsam3d", sha256=other_sha, progress=False).read_bytes() == OTHER
    assert _records(cache)["FastSAM3D.pth"]["pinned"] is True
    assert _records(cache)["FastSAM3D.pth"]["sha256"] == other_sha
    server.routes[registry_url] = ("ok", BODY)
    with pytest.warns(UserWarning, match="upstream file has changed"):
        hub.download("fastsam3d", progress=False, force=True)
    assert path.read_bytes() == BODY and _records(cache)["FastSAM3D.pth"]["sha256"] == BODY_SHA


def test_cancel_leaves_nothing(server, cache, registry_url):
    server.routes[registry_url] = ("ok", BODY)
    calls = []

    def cb(done, total):
        calls.append(done)
        return False if done >= 2 * CHUNK else None

    with pytest.raises(hub.DownloadCancelled):
        hub.download("fastsam3d", progress=False, progress_callback=cb)
    assert 0 < calls[-1] < len(BODY)
    assert _leftovers(cache) == [] and _records(cache) == {}


def test_remove_deletes_file_and_record_only(server, cache, registry_url):
    server.routes[registry_url] = ("ok", BODY)
    server.routes["/y/other.pth"] = ("ok", OTHER)
    hub.download("fastsam3d", progress=False)
    other = hub.download(f"{server.url}/y/other.pth", progress=False)
    stale = cache / ".FastSAM3D.pth.deadbeef.part"
    stale.write_bytes(b"left by a killed process")
    os.utime(stale, (0, 0))
    assert hub.remove("fastsam3d") is True
    assert not (cache / "FastSAM3D.pth").exists() and not stale.exists()
    assert _records(cache) == {} and other.read_bytes() == OTHER
    assert set(_records(other.parent)) == {"other.pth"}
    assert hub.cached_path("fastsam3d") is None
    assert hub.remove("fastsam3d") is False


def test_unrecorded_file_needs_force_or_pin(server, cache, registry_url):
    cache.mkdir()
    (cache / "FastSAM3D.pth").write_bytes(BODY)  # e.g. copied in by hand
    with pytest.raises(hub.ChecksumError, match="no recorded SHA-256"):
        hub.cached_path("fastsam3d")
    with pytest.raises(hub.ChecksumError, match="no recorded SHA-256"):
        hub.download("fastsam3d", progress=False)
    # Adopting it with its hash needs no network and records it.
    assert hub.download("fastsam3d", sha256=BODY_SHA, progress=False).read_bytes() == BODY
    assert server.hits == {}
    assert hub.cached_path("fastsam3d") == cache / "FastSAM3D.pth"


def test_corrupt_record_is_never_overwritten(server, cache, registry_url):
    server.routes[registry_url] = ("ok", BODY)
    cache.mkdir()
    (cache / hub.HASHES_FILE).write_text("{not json")
    with pytest.raises(hub.HubError, match="unreadable"):
        hub.download("fastsam3d", progress=False)
    assert (cache / hub.HASHES_FILE).read_text(encoding="utf-8") == "{not json"
    assert _leftovers(cache) == [] and server.hits == {}


def test_same_file_name_from_another_url_is_not_mixed_up(server, cache):
    server.routes["/a/model.pth"] = ("ok", BODY)
    server.routes["/b/model.pth"] = ("ok", OTHER)
    a = hub.download(f"{server.url}/a/model.pth", progress=False)
    b = hub.download(f"{server.url}/b/model.pth", progress=False)
    assert a != b and a.read_bytes() == BODY and b.read_bytes() == OTHER
    assert hub.cached_path(f"{server.url}/a/model.pth") == a


def test_dest_dir_keeps_its_own_record(server, cache, registry_url, tmp_path):
    server.routes[registry_url] = ("ok", BODY)
    elsewhere = tmp_path / "elsewhere"
    path = hub.download("fastsam3d", progress=False, dest_dir=elsewhere)
    assert path == elsewhere / "FastSAM3D.pth"
    assert set(_records(elsewhere)) == {"FastSAM3D.pth"} and not cache.exists()
    assert hub.cached_path("fastsam3d") is None
    assert hub.cached_path("fastsam3d", dest_dir=elsewhere) == path


# ---------------------------------------------------------------------------------------------
# CLI


def test_commands_are_registered_with_the_cli():
    from fastsam3d.commands import COMMANDS

    assert {"info", "download"} <= set(COMMANDS)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="fastsam3d")
    sub = parser.add_subparsers(dest="command", required=True)
    download_cmd.add_parser(sub)
    info_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    return cli.run_command(args)  # errors -> exit status in one place


def test_cli_download_list_remove(server, cache, registry_url, capsys):
    server.routes[registry_url] = ("ok", BODY)
    assert _cli(["download", "fastsam3d", "-q"]) == 0
    out = capsys.readouterr().out
    assert str(cache / "FastSAM3D.pth") in out and BODY_SHA in out
    assert _cli(["download", "--list", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "SHA-256 verified" in out and "sam-med3d-turbo" in out and "not downloaded" in out
    # newcomer p10: a file not downloaded yet said "size -"; now it says where the size shows
    assert "size -" not in out and "shows its size as it starts" in out
    assert _cli(["download", "--remove", "fastsam3d"]) == 0
    assert not (cache / "FastSAM3D.pth").exists()


def test_cli_download_errors(server, cache, tmp_path, capsys):
    server.routes["/s/model.pth"] = ("short", BODY)
    server.routes["/g/model.pth"] = ("ok", BODY)
    assert _cli(["download", f"{server.url}/s/model.pth", "-q"]) == 1
    assert "ended after" in capsys.readouterr().err
    target = tmp_path / "custom"
    url = f"{server.url}/g/model.pth"
    assert _cli(["download", url, "-q", "--sha256", "f" * 64, "--cache-dir", str(target)]) == 1
    assert "pinned" in capsys.readouterr().err and _leftovers(target) == []
    assert _cli(["download", url, "-q", "--sha256", BODY_SHA, "--cache-dir", str(target)]) == 0
    assert (url_dir(target, url) / "model.pth").read_bytes() == BODY
    assert _cli(["download", "no-such-weights"]) == 1
    assert "known names" in capsys.readouterr().err
    assert _cli(["download"]) == 2


def test_cli_info_reports_cache(server, cache, registry_url, capsys):
    server.routes[registry_url] = ("ok", BODY)
    hub.download("fastsam3d", progress=False)
    capsys.readouterr()
    assert _cli(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cache_dir"] == str(cache)
    weights = {w["name"]: w for w in data["weights"]}
    assert weights["fastsam3d"]["present"] and weights["fastsam3d"]["sha256"] == BODY_SHA
    assert not weights["sam-med3d-turbo"]["present"]
    assert "torch" in data and "cpu" in data
    # the torch-free engine is reported too (a fastsam3d[onnx] install showed only "no torch")
    try:
        import onnxruntime
    except ImportError:
        assert data["onnxruntime"] is None
    else:
        assert data["onnxruntime"]["version"] == onnxruntime.__version__
    assert _cli(["info"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out
    # one column for the states, also for the longest name (it overflowed a fixed width)
    rows = [ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()[0] in weights]
    assert len(rows) == len(data["weights"])
    assert len({len(row) - len(row[2:].split(None, 1)[1]) for row in rows}) == 1
