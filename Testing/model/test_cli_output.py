"""The CLI's output when its reader goes away (`fastsam3d info | head -1`)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_closed_pipe_is_not_an_error():
    """Before: "fastsam3d info: [Errno 32] Broken pipe (outputs are renamed ...)" and status 1."""
    code = (
        "import sys; from fastsam3d.cli import main; sys.argv[0] = 'fastsam3d'; "
        "sys.exit(main(['info']))"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first line, as `head -0` would
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write_end)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Broken pipe" not in err and "BrokenPipeError" not in err, err
