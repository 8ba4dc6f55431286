"""The Lib's Qt-free helpers: weights download task, size probe, dependency check, worker."""

from __future__ import annotations

import http.server
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "FastSAM3DSlicer"))

from FastSAM3DSlicerLib import deps, engine, weights  # noqa: E402
from FastSAM3DSlicerLib.worker import InferenceWorker  # noqa: E402

engine.ensure_fastsam3d_importable()  # the source-checkout fallback, as in Slicer


def _checkpoint_bytes() -> bytes:
    """A real PyTorch checkpoint file of ~4 MiB (several of the hub's 1 MiB reads), so that
    the hub's download check (issue 11) accepts it as a checkpoint."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, buffer)
    return buffer.getvalue()


PAYLOAD = _checkpoint_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    delay = 0.0

    def _head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        self._head()

    def do_GET(self):  # noqa: N802
        self._head()
        for i in range(0, len(PAYLOAD), 1 << 16):
            self.wfile.write(PAYLOAD[i : i + (1 << 16)])
            self.wfile.flush()
            time.sleep(self.delay)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/weights.pth"
    httpd.shutdown()
    _Handler.delay = 0.0


def test_size_is_known_before_download(server):
    assert weights.remote_size(server) == len(PAYLOAD)
    assert weights.human_size(len(PAYLOAD)) == "4.0 MB"
    assert weights.human_size(None) == "size unknown"


def test_download_reports_progress_and_keeps_the_file(server, tmp_path):
    task = weights.DownloadTask(server, dest_dir=tmp_path).start()
    assert task.wait(30)
    assert task.error is None and not task.cancelled
    assert task.path.read_bytes() == PAYLOAD
    assert task.done == task.total == len(PAYLOAD)


def test_cancel_leaves_nothing_behind(server, tmp_path):
    _Handler.delay = 0.01
    task = weights.DownloadTask(server, dest_dir=tmp_path).start()
    while task.done == 0 and not task.finished:
        time.sleep(0.01)
    task.cancel()
    assert task.wait(30)
    assert task.cancelled and task.path is None and task.error is None
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".pth", ".part")]


def test_weights_choices_put_fastsam3d_first_and_offer_a_local_file():
    keys = [c.key for c in weights.choices()]
    assert keys[0] == "fastsam3d" and "sam-med3d-turbo" in keys and keys[-1] == "local-file"


def test_dependency_check_reads_metadata_and_explains_the_plan():
    assert deps.version_ok("2.13.0+cpu", ">=2.4")
    assert not deps.version_ok("2.3.1", ">=2.4")
    assert deps.version_ok("4.66.1", ">=4.60")
    assert deps.parse("tqdm>=4.60") == ("tqdm", ">=4.60")
    torch_req = deps.torch_requirement()
    assert torch_req.installed is not None and torch_req.satisfied  # torch is in this env
    missing = [deps.Requirement("torch", ">=2.4", None), deps.Requirement("tqdm", ">=4.60", "4.1")]
    text = deps.plan_text(missing)
    assert "PyTorch extension" in text and "tqdm>=4.60 (installed: 4.1)" in text
    assert deps.missing() == [r for r in deps.missing() if not r.satisfied]


def test_worker_runs_tasks_in_order_on_one_thread():
    worker = InferenceWorker()
    seen = []
    futures = [
        worker.submit(lambda n=n: (seen.append(n), threading.get_ident())[1]) for n in range(20)
    ]
    idents = {f.result() for f in futures}
    assert seen == list(range(20))
    assert idents == {worker.thread_id} and threading.get_ident() not in idents
    worker.shutdown(wait=True)
