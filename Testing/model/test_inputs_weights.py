"""Issue 11, "Weights" rule: a file is a checkpoint or it is refused (before it is cached);
registry names bind only to registry entries; shapes and counts are checked before anything is
allocated; non-finite or non-floating weights are refused by name; every malformed file is a
CheckpointError; the torch floor (reliability review #3, #9-#12, #16, #19, #20, #25; newcomer
m4, m5, m12). Every broken file is generated here, small. Each test fails on the code before
the fix."""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import io
import json
import os
import pickle
import random
import struct
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import fastsam3d
from fastsam3d import checkpoint, cli, hashes, hub, weights
from fastsam3d.checkpoint import (
    CheckpointError,
    load_model,
    read_checkpoint,
    save_official,
    save_safetensors,
)
from fastsam3d.commands import convert as convert_cmd
from fastsam3d.testing import apply_recipe

TINY = dict(embed_dim=48, num_heads=3, out_chans=384)
HTML = b"<!DOCTYPE html>\n<html><body>Please log in to the guest Wi-Fi</body></html>\n"


def _tiny(name: str = "fastsam3d") -> fastsam3d.modeling.Sam3D:
    return apply_recipe(fastsam3d.build_model(name, **TINY))


@pytest.fixture(scope="module")
def tiny() -> fastsam3d.modeling.Sam3D:
    return _tiny()


@pytest.fixture(scope="module")
def tiny_sd(tiny) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny.state_dict().items()}


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---------------------------------------------------------------------------------------------
# a loopback server (127.0.0.1 only; it shuts itself down after 60 s at the latest)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body, kind = self.server.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes = {}
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv(hub.ENV_CACHE, str(d))
    return d


def _registry(monkeypatch, url: str, name: str = "fastsam3d") -> None:
    info = dataclasses.replace(weights.get_weights(name), url=url)
    monkeypatch.setitem(weights.WEIGHTS, name, info)


def _cache_files(cache: Path) -> list[str]:
    """Everything in the cache but the lock file: weights, records, partial downloads."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name != ".hashes.lock")


# ---------------------------------------------------------------------------------------------
# downloads: only checkpoints reach the cache (#12)


def test_html_page_with_status_200_is_not_cached(server, cache, monkeypatch):
    server.routes["/w/FastSAM3D.pth"] = (HTML, "text/html; charset=utf-8")
    server.routes["/mislabelled/FastSAM3D.pth"] = (HTML, "application/octet-stream")
    _registry(monkeypatch, f"{server.url}/w/FastSAM3D.pth")
    with pytest.raises(hub.DownloadError, match="web page"):
        hub.download("fastsam3d", progress=False)
    with pytest.raises(hub.DownloadError, match="HTML"):
        hub.download(f"{server.url}/mislabelled/FastSAM3D.pth", progress=False)
    assert _cache_files(cache) == []
    assert hub.cached_path("fastsam3d") is None
    assert not hub.cache_status("fastsam3d", verify=True).present


def test_html_file_url_is_not_cached_or_loaded(cache, tmp_path, monkeypatch):
    """The review's reproducer: a registry entry that resolves to a captive-portal page."""
    page = tmp_path / "portal.pth"  # no .html suffix: the bytes decide
    page.write_bytes(HTML)
    _registry(monkeypatch, page.as_uri())
    with pytest.raises(hub.DownloadError, match="HTML"):
        load_model("fastsam3d")
    assert _cache_files(cache) == []


@pytest.mark.parametrize("kind", ["truncated-zip", "random", "deflated-zip", "raw-pickle"])
def test_broken_downloads_are_not_cached(cache, tmp_path, tiny_sd, kind):
    good = _torch_bytes({"model_state_dict": tiny_sd})
    if kind == "truncated-zip":
        body = good[: len(good) // 2]
    elif kind == "random":
        body = os.urandom(50_000)
    elif kind == "deflated-zip":
        body = _deflated(_torch_bytes({"w": torch.zeros(4 << 20)}))
    else:
        body = pickle.dumps({"w": [0.0] * 100}, protocol=2)
    src = tmp_path / "src" / "model.pth"
    src.parent.mkdir()
    src.write_bytes(body)
    with pytest.raises(hub.DownloadError, match="nothing was kept"):
        hub.download(src.as_uri(), progress=False)
    assert _cache_files(cache) == []


def test_cached_non_checkpoint_says_to_force(cache, monkeypatch, tmp_path):
    """A page an older version cached (record and hash in order) is refused with the fix."""
    cache.mkdir()
    (cache / "FastSAM3D.pth").write_bytes(HTML)
    _registry(monkeypatch, (tmp_path / "gone.pth").as_uri())
    url = weights.get_weights("fastsam3d").url
    record = {
        "sha256": hub.sha256_file(cache / "FastSAM3D.pth"),
        "size": len(HTML),
        "url": url,
        "recorded": "2026-01-01T00:00:00+00:00",
        "pinned": False,
    }
    (cache / hub.HASHES_FILE).write_text(
        json.dumps({"format": 1, "files": {"FastSAM3D.pth": record}})
    )
    with pytest.raises(hub.HubError, match="HTML.*--force"):
        load_model("fastsam3d")
    assert hub.cache_status("fastsam3d", verify=True).verified is False


# ---------------------------------------------------------------------------------------------
# names vs paths (#10, #11, m12)


def test_url_download_cannot_take_over_a_registry_name(cache, tmp_path, monkeypatch, tiny):
    other = tmp_path / "elsewhere" / "FastSAM3D.pth"
    other.parent.mkdir()
    save_safetensors(_tiny(), other)
    url_path = hub.download(other.as_uri(), progress=False)
    assert hub.cached_path("fastsam3d") is None
    assert not hub.cache_status("fastsam3d").present
    registry_src = tmp_path / "registry" / "FastSAM3D.pth"
    registry_src.parent.mkdir()
    save_official(tiny, registry_src)
    _registry(monkeypatch, registry_src.as_uri())
    path = hub.download("fastsam3d", progress=False)
    assert path != url_path and path.read_bytes() == registry_src.read_bytes()
    assert url_path.read_bytes() == other.read_bytes()  # both kept, each under its own name
    assert hub.cached_path(other.as_uri()) == url_path


def test_registry_file_recorded_from_another_url_is_refused(cache, tmp_path, tiny_sd):
    """A cache written before the namespaces: FastSAM3D.pth recorded from some other URL."""
    cache.mkdir()
    (cache / "FastSAM3D.pth").write_bytes(_torch_bytes({"model_state_dict": tiny_sd}))
    record = {
        "sha256": hub.sha256_file(cache / "FastSAM3D.pth"),
        "size": 1,
        "url": "http://example.invalid/FastSAM3D.pth",
        "recorded": "x",
        "pinned": False,
    }
    record["size"] = (cache / "FastSAM3D.pth").stat().st_size
    (cache / hub.HASHES_FILE).write_text(
        json.dumps({"format": 1, "files": {"FastSAM3D.pth": record}})
    )
    with pytest.raises(hub.ChecksumError, match="downloaded from http://example.invalid"):
        hub.cached_path("fastsam3d")
    with pytest.raises(hub.ChecksumError, match="--force"):
        hub.download("fastsam3d", progress=False)
    status = hub.cache_status("fastsam3d")
    assert status.verified is False and "example.invalid" in status.error


@pytest.mark.parametrize("shadow", ["folder", "file"])
def test_name_in_the_working_directory_does_not_shadow_the_registry(
    cache, tmp_path, monkeypatch, tiny, shadow
):
    src = tmp_path / "registry" / "FastSAM3D.pth"
    src.parent.mkdir()
    save_official(tiny, src)
    _registry(monkeypatch, src.as_uri())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if shadow == "folder":
        (work / "fastsam3d").mkdir()
    else:
        sd = {k: v + 1.0 for k, v in tiny.state_dict().items()}  # other weights, same shapes
        save_official(sd, work / "fastsam3d")
    model = load_model("fastsam3d", config=tiny.config)  # the registry entry, verified
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values())
    )
    if shadow == "file":  # the file itself is still reachable as a path
        local = load_model("./fastsam3d", config=tiny.config)
        assert not torch.equal(
            next(iter(local.state_dict().values())), next(iter(tiny.state_dict().values()))
        )


# ---------------------------------------------------------------------------------------------
# files that are not checkpoints (#19, #25, m5)


def _deflated(data: bytes) -> bytes:
    """The same torch zip archive, with every entry deflate-compressed (torch never does)."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (HTML, "HTML"),
        (b"model weights, see https://example.org\n" * 3, "text file"),
        (b"\x1f\x8b\x08\x00" + random.Random(1).randbytes(200), "compressed archive"),
        # a "{" at byte 8 (chance in a gzip header: the random bytes above failed 1 run in 256)
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00{" + bytes(200), "compressed archive"),
        (
            random.Random(3).randbytes(4096).replace(b"PK", b"pk").replace(b"\x80", b"\x81"),
            "unknown format",
        ),
        (b"", "empty"),
        (None, "is a directory"),
    ],
)
def test_non_checkpoints_are_named_for_what_they_are(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert "could run code" not in str(err.value)


def test_truncated_zip_is_refused_as_damaged(tmp_path, tiny_sd):
    data = _torch_bytes({"model_state_dict": tiny_sd})
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or damaged zip"):
        read_checkpoint(path)


def test_zip_that_would_inflate_is_refused_before_loading(tmp_path):
    path = tmp_path / "bomb.pth"
    path.write_bytes(_deflated(_torch_bytes({"w": torch.zeros(8 << 20)})))  # 32 MiB of zeros
    assert path.stat().st_size < 200_000
    with pytest.raises(CheckpointError, match="inflate"):
        read_checkpoint(path)


_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_safetensors({"a": _F32}, b"\0" * 8, length=1 << 62), "header length"),
        (_safetensors({"a": _F32, "b": {**_F32, "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
        (_safetensors({"a": {**_F32, "shape": [3]}}, b"\0" * 8), "has 8 bytes"),
        (_safetensors({"a": _F32}, b"\0" * 4), "outside"),
        (
            _safetensors(
                {"a": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 8]}},
                b"\0" * 8,
            ),
            "has 8 bytes",
        ),
        (_safetensors({"a": {**_F32, "dtype": "X9"}}, b"\0" * 8), "unknown dtype"),
        (_safetensors({"a": {**_F32, "shape": [-2]}}, b"\0" * 8), "malformed shape"),
        (struct.pack("<Q", 6) + b"{nope}" + b"\0" * 8, "not JSON"),
    ],
)
def test_malformed_safetensors_are_checkpoint_errors(tmp_path, data, message):
    for name in ("w.safetensors", "w.pth"):  # the bytes decide, not the suffix
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_model(path)


# ---------------------------------------------------------------------------------------------
# shapes and counts before allocation (#9)


def _no_building(monkeypatch) -> None:
    """Make any network construction fail loudly: the refusals must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network was built for a file that should have been refused")

    monkeypatch.setattr(checkpoint, "build_model", refuse)  # also the meta-device skeleton


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"image_encoder.blocks.99999.x": torch.zeros(1)}, "none for blocks"),
        ({"image_encoder.blocks.0.norm2.weight": torch.zeros(65538)}, "width 65538"),
        (
            {
                "image_encoder.blocks.70.x": torch.zeros(1),
                **{f"image_encoder.blocks.{b}.x": torch.zeros(1) for b in range(1, 70)},
            },
            "depth 71",
        ),
    ],
)
def test_small_files_that_imply_huge_networks_are_refused_first(
    tmp_path, monkeypatch, extra, message
):
    sd = {
        "image_encoder.blocks.0.norm2.weight": torch.zeros(768),
        "image_encoder.neck.0.weight": torch.zeros(384),
        "mask_decoder.x": torch.zeros(1),
        **extra,
    }
    path = tmp_path / "deep.pth"
    torch.save(sd, path)
    assert path.stat().st_size < 300_000
    _no_building(monkeypatch)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_custom_network_is_checked_on_the_meta_device(tmp_path, monkeypatch):
    """All 40 blocks present but with 1-element tensors: the keys/shapes report comes from a
    skeleton that allocates nothing, never from a real 40-block network."""
    sd = {f"image_encoder.blocks.{b}.norm2.weight": torch.zeros(768) for b in range(40)}
    sd.update({"image_encoder.neck.0.weight": torch.zeros(384), "mask_decoder.x": torch.zeros(1)})
    path = tmp_path / "wide.pth"
    torch.save(sd, path)

    real = checkpoint.build_model

    def only_on_meta(*args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a real network was built before the shapes were checked")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "build_model", only_on_meta)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# values (#8, #20)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tiny_sd):
    sd = {k: v.clone() for k, v in tiny_sd.items()}
    sd["image_encoder.blocks.0.mlp.lin1.weight"][0, 0] = float("nan")
    sd["mask_decoder.iou_token.weight"][0, :3] = float("inf")
    path = tmp_path / "nan.pth"
    save_official(sd, path)
    with pytest.raises(CheckpointError, match="non-finite") as err:
        load_model(path)
    msg = str(err.value)
    assert "image_encoder.blocks.0.mlp.lin1.weight: 1 of" in msg
    assert "mask_decoder.iou_token.weight: 3 of" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_weights_are_refused(tmp_path, tiny_sd, dtype):
    sd = dict(tiny_sd)
    sd["image_encoder.neck.1.weight"] = tiny_sd["image_encoder.neck.1.weight"].to(dtype)
    path = tmp_path / "ints.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"wrong dtypes \(1\)"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# every malformed state dict is a CheckpointError (#16)


def _malformed(tiny_sd: dict, kind: str) -> dict:
    sd = dict(tiny_sd)
    pre = "image_encoder.blocks."
    if kind == "int-key":
        sd[0] = torch.zeros(1)
    elif kind == "non-int-block":
        sd[f"{pre}foo.w"] = torch.zeros(1)
    elif kind == "no-norm2":
        del sd[f"{pre}0.norm2.weight"]
    elif kind == "no-neck":
        del sd["image_encoder.neck.0.weight"]
    elif kind == "1d-rel-pos":
        sd[f"{pre}2.attn.rel_pos_d"] = torch.zeros(15)
    elif kind == "0d-norm2":
        sd[f"{pre}0.norm2.weight"] = torch.tensor(1.0)
    elif kind == "heads-do-not-divide":
        sd[f"{pre}0.norm2.weight"] = torch.zeros(50)  # rel-pos tables give head width 16
    return sd


@pytest.mark.parametrize(
    "kind",
    [
        "int-key",
        "non-int-block",
        "no-norm2",
        "no-neck",
        "1d-rel-pos",
        "0d-norm2",
        "heads-do-not-divide",
    ],
)
def test_malformed_state_dicts_are_checkpoint_errors(tmp_path, tiny_sd, kind):
    path = tmp_path / f"{kind}.pth"
    torch.save({"model_state_dict": _malformed(tiny_sd, kind)}, path)
    with pytest.raises(CheckpointError):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# crafted pickles: still refused without running, with our own message (#19, m5)


class _Payload:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(_Payload.marker)!r}).touch()",))


@pytest.mark.parametrize("payload", [_Payload, _Eval])
def test_crafted_pickles_are_refused_without_running(tmp_path, payload):
    _Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "payload": payload()}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_model(path)
    msg = str(err.value)
    assert not _Payload.marker.exists(), "unpickling ran code"
    assert "system" in msg or "eval" in msg  # the global that was refused is named
    assert "weights_only" not in msg and "\x1b[" not in msg  # no unsafe workaround, no ANSI


# ---------------------------------------------------------------------------------------------
# the torch floor (#3)


def test_torch_floor_is_one_constant_and_old_torch_refuses_pickles(tmp_path, tiny, monkeypatch):
    from fastsam3d import _requirements as req

    assert req.TORCH_REQUIREMENT == ">=2.10" and "GHSA-63cw-57p8-fm3p" in req.TORCH_ADVISORY
    assert fastsam3d.TORCH_REQUIREMENT == req.TORCH_REQUIREMENT
    if sys.version_info >= (3, 11):
        import tomllib

        toml = Path(__file__).resolve().parents[2] / "model" / "pyproject.toml"
        project = tomllib.loads(toml.read_text(encoding="utf-8"))["project"]
        deps = project["optional-dependencies"]["torch"]  # torch is the `torch` extra
        assert f"torch{req.TORCH_REQUIREMENT}" in deps
    assert not req.torch_loads_pickles_safely("2.9.1") and req.torch_loads_pickles_safely("2.10.0")
    pth, st = save_official(tiny, tmp_path / "w.pth"), save_safetensors(tiny, tmp_path / "w.st")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    with pytest.raises(CheckpointError, match="GHSA-63cw-57p8-fm3p.*safetensors"):
        read_checkpoint(pth)
    assert load_model(st).config.embed_dim == TINY["embed_dim"]  # safetensors need no unpickler


# ---------------------------------------------------------------------------------------------
# the convert command (#16, m4)


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastsam3d")
    convert_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return cli.run_command(args)  # errors -> exit status in one place


def test_convert_refuses_bad_input_in_one_line(tmp_path, cache, monkeypatch, capsys, tiny):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_safetensors({"a": _F32}, b"\0" * 4))
    assert _convert([str(bad), str(tmp_path / "out.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastsam3d convert:") and "Traceback" not in err
    _registry(monkeypatch, (tmp_path / "offline" / "FastSAM3D.pth").as_uri())
    assert _convert(["fastsam3d", str(tmp_path / "out.safetensors")]) == 1  # no network
    assert "fastsam3d convert:" in capsys.readouterr().err
    good = save_official(tiny, tmp_path / "good.pth")
    os.link(good, tmp_path / "alias.pth")
    before = good.read_bytes()
    assert _convert([str(good), str(tmp_path / "alias.pth")]) == 1  # a hard link to the input
    assert "overwrite an input" in capsys.readouterr().err and good.read_bytes() == before
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# a broken cache gives HubError sentences, never raw OS errors; `info` never fails (#17)


def _info(capsys) -> int:
    from fastsam3d.commands import info as info_cmd

    parser = argparse.ArgumentParser(prog="fastsam3d")
    info_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["info"])
    rc = args.func(args)
    capsys.readouterr()
    return rc


@pytest.mark.parametrize(
    "broken", ["cache-is-a-file", "record-is-a-directory", "record-not-utf8", "lock-is-a-directory"]
)
def test_broken_cache_gives_hub_errors(tmp_path, monkeypatch, capsys, tiny, broken):
    src = save_safetensors(tiny, tmp_path / "src" / "FastSAM3D.safetensors")
    _registry(monkeypatch, src.as_uri())
    cache = tmp_path / "cache"
    if broken == "cache-is-a-file":
        cache.write_bytes(b"not a folder")
    elif broken == "record-is-a-directory":
        (cache / hub.HASHES_FILE).mkdir(parents=True)
    elif broken == "lock-is-a-directory":
        (cache / ".hashes.lock").mkdir(parents=True)
    else:
        cache.mkdir()
        (cache / hub.HASHES_FILE).write_bytes(b"\xff\xfe\x00\x01binary")
    monkeypatch.setenv(hub.ENV_CACHE, str(cache))
    with pytest.raises(hub.HubError):
        hub.download("fastsam3d", progress=False)
    status = hub.cache_status("fastsam3d", verify=True)  # never raises
    assert not status.present or status.verified is False
    assert _info(capsys) == 0
    assert not (cache / "FastSAM3D.pth").exists()  # nothing half-recorded


def test_every_registered_config_is_usable_by_name(cache, tmp_path, monkeypatch):
    """newcomer m3: the third config is listed but could not be used by name. Its registry entry
    shares the sam-med3d-turbo file (one download, one record)."""
    assert {w.config for w in fastsam3d.list_weights()} == set(fastsam3d.configs.CONFIGS)
    teacher = _tiny("sam-med3d-turbo")
    src = save_official(teacher, tmp_path / "src" / "sam_med3d_turbo.pth")
    for name in ("sam-med3d-turbo", "sam-med3d-turbo-fastsam3d-block"):
        _registry(monkeypatch, src.as_uri(), name)
    path = hub.download("sam-med3d-turbo", progress=False)
    assert hub.cached_path("sam-med3d-turbo-fastsam3d-block") == path
    cfg = fastsam3d.get_config("sam-med3d-turbo-fastsam3d-block", **TINY)
    model = load_model("sam-med3d-turbo-fastsam3d-block", config=cfg)
    assert model.config.block_style == "fastsam3d"


def test_url_downloads_are_listed_and_removable(cache, tmp_path, capsys, tiny):
    """newcomer m12: weights fetched by URL were invisible to `download --list` and could not
    be removed; they are listed with their path and removed by URL."""
    from fastsam3d.commands import download as download_cmd

    src = save_safetensors(tiny, tmp_path / "src" / "my_weights.safetensors")
    path = hub.download(src.as_uri(), progress=False)
    parser = argparse.ArgumentParser(prog="fastsam3d")
    download_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["download", "--list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert src.as_uri() in out and str(path) in out
    args = parser.parse_args(["download", "--remove", src.as_uri()])
    assert args.func(args) == 0 and not path.exists()
    assert hub.url_downloads() == []


@pytest.mark.parametrize("style", ["banana", "42"])
def test_unknown_recorded_block_style_is_a_checkpoint_error(tmp_path, tiny, style):
    path = save_safetensors(tiny, tmp_path / "odd.safetensors", metadata={"block_style": style})
    with pytest.raises(CheckpointError, match="block style"):
        load_model(path)


def test_full_disk_and_read_only_cache_give_hub_errors(cache, tmp_path, monkeypatch, tiny):
    """ENOSPC while writing hashes.json and EROFS on cleanup / remove (#17), simulated: the
    user gets a HubError sentence (the CLI prints one line), never a raw OSError."""
    import errno

    src = save_safetensors(tiny, tmp_path / "src" / "FastSAM3D.safetensors")
    _registry(monkeypatch, src.as_uri())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(hashes, "_write_json_atomic", full)
        with pytest.raises(hub.HubError, match="No space left"):
            hub.download("fastsam3d", progress=False)
    # The file without a record is refused on the next use, with the fix named.
    with pytest.raises(hub.ChecksumError, match="--force"):
        hub.cached_path("fastsam3d")
    hub.download("fastsam3d", progress=False, force=True)
    real_unlink = Path.unlink

    def read_only(self, *args, **kwargs):
        if self.parent == cache or self.parent.parent.parent == cache:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(hub.HubError, match="Read-only"):
        hub.remove("fastsam3d")

    def failed_transfer(*args, **kwargs):
        raise hub.DownloadError("downloading failed: disk full")

    monkeypatch.setattr(hub, "_fetch", failed_transfer)
    # The EROFS of the cleanup never replaces the real error.
    with pytest.raises(hub.DownloadError, match="disk full"):
        hub.download(src.as_uri(), progress=False)
