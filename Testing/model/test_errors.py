"""One error policy: every fastsam3d error derives from FastSAM3DError (keeping its builtin
base) and is exported at the top level; the CLI maps errors to exit statuses in one place."""

from __future__ import annotations

import argparse
import ast
import importlib

import pytest

import fastsam3d
from fastsam3d import cli
from fastsam3d.errors import CommandError, FastSAM3DError, UsageError

PKG = fastsam3d.__path__[0]


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) for every exception class the package defines (found with ``ast``)."""
    import pathlib

    found = []
    root = pathlib.Path(PKG)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                for b in node.bases
            ):
                found.append((module, node.name))
    return found


def test_every_package_error_derives_from_the_root():
    classes = _error_classes()
    assert ("fastsam3d.errors", "ChecksumError") in classes and len(classes) >= 12
    for module, name in classes:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # an optional extra (serve, onnx) not installed here
            pytest.skip(f"{module}: {exc}")
        cls = getattr(mod, name)
        assert issubclass(cls, FastSAM3DError), f"{module}.{name} does not derive from the root"


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("VolumeError", ValueError),
        ("SessionError", ValueError),
        ("PromptError", ValueError),
        ("WireError", ValueError),
        ("UsageError", ValueError),
        ("CheckpointError", RuntimeError),
        ("CheckpointReadError", RuntimeError),
        ("HubError", RuntimeError),
        ("DownloadError", RuntimeError),
        ("ChecksumError", RuntimeError),
        ("DownloadCancelled", RuntimeError),
        ("RemoteError", RuntimeError),
        ("SessionExpiredError", RuntimeError),
        ("CommandError", FastSAM3DError),
    ],
)
def test_public_errors_are_exported_and_keep_their_builtin_base(name, builtin):
    cls = getattr(fastsam3d, name)
    assert name in fastsam3d.__all__
    assert issubclass(cls, FastSAM3DError) and issubclass(cls, builtin)


def test_the_checkpoint_error_is_one_class_wherever_it_is_imported_from():
    from fastsam3d import checkpoint, hub, volume

    assert checkpoint.CheckpointError is hub.CheckpointError is fastsam3d.CheckpointError
    assert hub.ChecksumError is fastsam3d.ChecksumError  # the hub re-exports its errors
    assert volume.VolumeError is fastsam3d.VolumeError


def _raising(exc: BaseException):
    def func(args: argparse.Namespace) -> int:
        raise exc

    return func


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (UsageError("--label 0: must be 1..65535"), 2, "--label 0: must be 1..65535"),
        (fastsam3d.VolumeError("img.nii is truncated"), 1, "img.nii is truncated"),
        (fastsam3d.CheckpointError("not a checkpoint"), 1, "not a checkpoint"),
        (fastsam3d.DownloadError("no network"), 1, "no network"),
        (fastsam3d.RemoteError("server said 503"), 1, "server said 503"),
        (fastsam3d.SessionError("no volume set"), 1, "no volume set"),
        (ValueError("unknown name"), 1, "unknown name"),
        (FileNotFoundError(2, "No such file or directory", "x.nii"), 1, "No such file"),
        (CommandError("no weights for 'fastsam3d'", 3), 3, "no weights for 'fastsam3d'"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("bug"), 1, "RuntimeError: bug"),
    ],
)
def test_the_cli_maps_each_kind_of_error_to_its_exit_status(
    exc, code, message, capsys, monkeypatch
):
    monkeypatch.delenv("FASTSAM3D_DEBUG", raising=False)
    args = argparse.Namespace(command="segment", func=_raising(exc))
    assert cli.run_command(args) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsam3d segment: ") and message in lines[0]


def test_an_unexpected_error_shows_its_traceback_with_fastsam3d_debug(monkeypatch):
    monkeypatch.setenv("FASTSAM3D_DEBUG", "1")
    args = argparse.Namespace(command="segment", func=_raising(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        cli.run_command(args)


def test_commands_map_no_errors_themselves():
    """The mapping lives in cli.py only: no command prints to stderr and returns a status."""
    import pathlib

    for path in (pathlib.Path(PKG) / "commands").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "raise SystemExit" not in text, path.name
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.body:
                last = node.body[-1]
                assert not (
                    isinstance(last, ast.Return)
                    and isinstance(last.value, ast.Constant)
                    and type(last.value.value) is int
                ), f"{path.name}:{node.lineno} maps an error to an exit status"
