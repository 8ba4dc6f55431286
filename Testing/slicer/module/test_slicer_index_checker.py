"""The Extensions Index's own checker, run on this checkout as the Index CI runs it (review B3).

``third_party/extensions_index/check_description_files.py`` is Slicer/ExtensionsIndex's checker,
unmodified (README.md there: commit, hashes, license). The Index CI runs its ``main()`` on a
submitted ``<Extension>.json``: it clones ``scm_url``, checks the repository size, downloads the
JSON schema, asks the GitHub API for the repository's topics, reads the top-level
``CMakeLists.txt`` as text and downloads the icon and screenshot URLs it finds there.

Here every one of those network calls is answered locally, and nothing else may go out:
- ``git clone <scm_url>`` is redirected (git ``insteadOf``) to a snapshot of this working tree
  committed on a ``main`` branch, so the checks read exactly what the checkout holds;
- ``requests.get`` is routed to a loopback HTTP server that serves the vendored schema, the
  topics the real repository must carry, and
  ``raw.githubusercontent.com/<owner>/<repo>/main/<path>`` from the snapshot (images as
  ``image/png``, as GitHub serves them; a missing file is a 404). Any other URL fails the test.

What stays unverified until the real repository exists: that it has the ``3d-slicer-extension``
topic and that GitHub really serves the icon and screenshot (docs/slicer.md lists it).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import urllib.parse
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("jsonschema")
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")

REPO = Path(__file__).resolve().parents[3]
VENDOR = Path(__file__).resolve().parent / "third_party" / "extensions_index"
EXTENSION = "FastSAM3DSlicer"
VENDORED_SHA256 = {  # the table in third_party/extensions_index/README.md
    "check_description_files.py": "b53a643d22302b9b5ce3f937e08b42118f04327f59872a67ab364163f10e56bd",  # noqa: E501
    "slicer-extension-catalog-entry-schema-v1.0.2.json": "07107db15382ab027bf00dcffdd03ae859a43a4ea167a522b5fcaee5c14641a2",  # noqa: E501
    "PyTorch.json": "f77536914d4e311eb6c4bcd28139eab8f6b4858fe22795cfe6e67e580e6a31e9",
}
# The one construct newer than Python 3.11 in the checker: a backslash inside an f-string
# expression, in print_categories (the --print-categories option, which no check calls). The
# Index CI runs Python 3.12; CI here may run 3.11, so only that line is rewritten, in memory,
# into the same output. The file on disk stays byte-identical (test_vendored_files_unmodified).
_CATEGORIES = "for category in sorted(extensions_for_categories.keys())"
_PY312_LINE = """    print(f"[\\n{'\\n'.join(f'    "{category}",' """ + _CATEGORIES + """)}\\n]")"""
_PY311_LINE = (
    """    print("[\\n" + "\\n".join(f'    "{category}",' """ + _CATEGORIES + """) + "\\n]")"""
)
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def load_checker() -> types.ModuleType:
    path = VENDOR / "check_description_files.py"
    source = path.read_text(encoding="utf-8")
    if sys.version_info < (3, 12):
        assert source.count(_PY312_LINE) == 1, "the vendored checker changed: update the shim"
        source = source.replace(_PY312_LINE, _PY311_LINE)
    module = types.ModuleType("check_description_files")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, **GIT_ENV},
    )


def snapshot(dest: Path, replace: dict[str, str] | None = None) -> Path:
    """This working tree (tracked and untracked-but-not-ignored files) committed on `main`."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=60,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel, text in (replace or {}).items():
        (dest / rel).write_text(text)
    _git("init", "-q", "-b", "main", cwd=dest)
    _git("add", "-A", cwd=dest)
    _git("commit", "-q", "-m", "snapshot", cwd=dest)
    return dest


class _Handler(http.server.BaseHTTPRequestHandler):
    snapshot_dir: Path
    topics: list[str]

    def do_GET(self):  # noqa: N802
        parts = urllib.parse.urlsplit(self.path).path.lstrip("/").split("/")
        body, ctype = None, "application/octet-stream"
        if parts[0] == "schema" and len(parts) == 2 and (VENDOR / parts[1]).is_file():
            body, ctype = (VENDOR / parts[1]).read_bytes(), "application/json"
        elif parts[0] == "repos" and parts[-1] == "topics":
            body, ctype = json.dumps({"names": self.topics}).encode(), "application/json"
        elif parts[0] == "raw" and len(parts) > 4:
            rev, rel = parts[3], "/".join(parts[4:])
            shown = subprocess.run(
                ["git", "show", f"{rev}:{rel}"],
                cwd=self.snapshot_dir,
                capture_output=True,
                timeout=30,
            )
            if shown.returncode == 0:
                body = shown.stdout
                ctype = mimetypes.guess_type(rel)[0] or "text/plain; charset=utf-8"
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def local_index(snapshot_dir: Path, topics: list[str]):
    """Loopback server + requests.get routed to it + git clone redirected to the snapshot."""
    handler = type("Handler", (_Handler,), {"snapshot_dir": snapshot_dir, "topics": topics})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    entry = json.loads((REPO / f"{EXTENSION}.json").read_text(encoding="utf-8"))
    owner, name = urllib.parse.urlsplit(entry["scm_url"]).path.strip("/").split("/")[:2]
    name = name.removesuffix(".git")
    routes = [
        (
            r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/([^/]+)",
            base + "/schema/{0}",
        ),
        (
            rf"https://api\.github\.com/repos/{owner}/{name}/topics",
            base + f"/repos/{owner}/{name}/topics",
        ),
        (
            rf"https://raw\.githubusercontent\.com/{owner}/{name}/(.+)",
            base + f"/raw/{owner}/{name}/{{0}}",
        ),
    ]
    real_get = requests.get
    calls: list[str] = []

    def fake_get(url: str, *args, **kwargs):
        for pattern, target in routes:
            m = re.fullmatch(pattern, url)
            if m:
                calls.append(url)
                return real_get(target.format(*m.groups()), *args, **kwargs)
        raise AssertionError(f"the checker tried to reach {url}, which this test does not serve")

    saved = {
        k: os.environ.get(k)
        for k in (
            "GIT_CONFIG_COUNT",
            "GIT_CONFIG_KEY_0",
            "GIT_CONFIG_VALUE_0",
            "GIT_ALLOW_PROTOCOL",
        )
    }
    os.environ.update(
        {  # git clone <scm_url> -> the snapshot; no other protocol allowed
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": f"url.{snapshot_dir.as_uri()}.insteadOf",
            "GIT_CONFIG_VALUE_0": entry["scm_url"],
            "GIT_ALLOW_PROTOCOL": "file",
        }
    )
    requests.get = fake_get
    try:
        yield calls
    finally:
        requests.get = real_get
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        httpd.shutdown()
        httpd.server_close()


def run_checker(
    tmp_path: Path, snapshot_dir: Path, topics: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, list[str]]:
    """The Index CI's invocation: `check_description_files.py <Extension>.json` in the index."""
    index = tmp_path / "index"
    index.mkdir()
    shutil.copy(REPO / f"{EXTENSION}.json", index)
    shutil.copy(VENDOR / "PyTorch.json", index)  # our build dependency, as the Index holds it
    checker = load_checker()
    monkeypatch.chdir(index)
    monkeypatch.setattr(sys, "argv", ["check_description_files.py", f"{EXTENSION}.json"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its clone lands under tmp_path
    out = io.StringIO()
    with local_index(snapshot_dir, topics) as calls, contextlib.redirect_stdout(out):
        rc = checker.main()
    return rc, out.getvalue(), calls


@pytest.fixture(scope="module")
def checkout_snapshot(tmp_path_factory) -> Path:
    return snapshot(tmp_path_factory.mktemp("snapshot"))


def test_vendored_files_unmodified():
    for name, digest in VENDORED_SHA256.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    readme = (VENDOR / "README.md").read_text(encoding="utf-8")
    assert all(d in readme for d in VENDORED_SHA256.values())
    assert "07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c" in readme
    assert "Brigham" in (VENDOR / "LICENSE.txt").read_text(encoding="utf-8")


def test_index_checker_passes_on_this_checkout(tmp_path, checkout_snapshot, monkeypatch):
    rc, out, calls = run_checker(tmp_path, checkout_snapshot, ["3d-slicer-extension"], monkeypatch)
    assert ":x:" not in out and rc == 0, out
    for check in (
        "Clone repository",
        "Check repository size",
        "Check JSON schema",
        "Check JSON file format",
        "Check extension name",
        "Check category",
        "Check git repository name",
        "Check git repository topics",
        "Check SCM URL syntax",
        "Check CMakeLists.txt content",
        "Check license file",
    ):
        assert f":white_check_mark: {check} completed successfully" in out, check
    assert "Extension icon URL: https://raw.githubusercontent.com/" in out
    assert "Extension screenshot URL: https://raw.githubusercontent.com/" in out
    assert ":white_check_mark: Dependency check completed successfully" in out
    # every network call was one the Index CI makes, and was answered here
    assert any("/topics" in c for c in calls) and any("Schemas/" in c for c in calls)
    assert sum(c.endswith(".png") for c in calls) == 2


def test_index_checker_rejects_urls_built_from_cmake_variables(tmp_path, monkeypatch):
    """The pre-fix CMakeLists.txt form (review B3): `${FASTSAM3D_RAW}/...` is not an http URL."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    m = re.search(r'set\(EXTENSION_ICONURL "(https://\S+?/main)/', text)
    assert m, "expected a literal raw.githubusercontent.com icon URL"
    old = text.replace(m.group(1), "${FASTSAM3D_RAW}").replace(
        "project(FastSAM3DSlicer)", f'project(FastSAM3DSlicer)\nset(FASTSAM3D_RAW "{m.group(1)}")'
    )
    snap = snapshot(tmp_path / "snap", replace={"CMakeLists.txt": old})
    rc, out, _ = run_checker(tmp_path, snap, ["3d-slicer-extension"], monkeypatch)
    assert rc == 1
    assert (
        "EXTENSION_ICONURL '${FASTSAM3D_RAW}/Resources/Icons/FastSAM3DSlicer.png' should be "
        "a valid URL starting with 'http'" in out
    )


def test_index_checker_needs_the_topic_and_the_images(tmp_path, checkout_snapshot, monkeypatch):
    """What the fake answers matters: no topic, or an image not in the repository, fails."""
    rc, out, _ = run_checker(tmp_path, checkout_snapshot, [], monkeypatch)
    assert rc == 1 and "does not have the '3d-slicer-extension' topic" in out
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    text = text.replace("Screenshots/FastSAM3DSlicer.png", "Screenshots/missing.png")
    snap = snapshot(tmp_path / "snap", replace={"CMakeLists.txt": text})
    (tmp_path / "second").mkdir()
    rc, out, _ = run_checker(tmp_path / "second", snap, ["3d-slicer-extension"], monkeypatch)
    assert rc == 1 and "failed to download extension_screenshoturls" in out.lower()
