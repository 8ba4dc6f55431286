"""What the module needs from Python packages, checked without importing them.

Installing is done by the Widget inside Slicer (PyTorch extension for torch, Slicer's pip
helpers for the rest), because only the application can show the dialogs and restart. This
module only answers "what is missing" from package metadata, so the check is instant and never
imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

# torch comes from the PyTorch extension (light-the-torch picks the CUDA build that matches the
# driver); a plain pip install would fetch a CPU-only or mismatched wheel. Its floor is
# fastsam3d's own (package_torch_requirement), except on Python 3.9 (Slicer 5.8), where no torch
# that high exists: there the oldest torch fastsam3d's code runs on is asked for, and fastsam3d
# reads only .safetensors checkpoints (it refuses to unpickle .pth files below its floor).
PY39_TORCH_REQUIREMENT = ">=2.5"  # FlexAttention and torch.serialization.safe_globals
# Everything else fastsam3d imports on the Slicer paths that Slicer does not bundle (numpy and
# SimpleITK ship with Slicer): tqdm (download progress), safetensors (.safetensors checkpoints,
# offered by the file dialog). A test scans those imports. Floors only: pins would fight
# other extensions.
PIP_REQUIREMENTS = ("tqdm>=4.60", "safetensors>=0.4")


@dataclasses.dataclass(frozen=True)
class Requirement:
    name: str
    spec: str  # ">=2.4"
    installed: str | None  # version, or None when absent

    @property
    def text(self) -> str:
        return f"{self.name}{self.spec}"

    @property
    def satisfied(self) -> bool:
        return self.installed is not None and version_ok(self.installed, self.spec)


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def version_ok(installed: str, spec: str) -> bool:
    """Only '>=' floors are used here; anything else is treated as satisfied if installed."""
    m = re.fullmatch(r"\s*>=\s*([0-9][0-9a-zA-Z.+]*)\s*", spec)
    if not m:
        return True
    have, need = _version_tuple(installed), _version_tuple(m.group(1))
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", requirement)
    if not m:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return m.group(1), m.group(2).strip()


def package_torch_requirement() -> str:
    """fastsam3d's torch floor, from the bundled package (the one value model/pyproject.toml
    also states; a test keeps them equal)."""
    prefer_bundled_fastsam3d()
    try:
        from fastsam3d._requirements import TORCH_REQUIREMENT
    except ImportError:  # a fastsam3d from before _requirements: its pyproject floor
        return ">=2.4"
    return TORCH_REQUIREMENT


def torch_spec(python: tuple = tuple(sys.version_info[:2])) -> str:
    """The torch floor the dependency step asks PyTorchUtils for on this Python."""
    if tuple(python[:2]) < (3, 10):
        return PY39_TORCH_REQUIREMENT
    return package_torch_requirement()


def python39_note(python: tuple = tuple(sys.version_info[:2])) -> str | None:
    """What Slicer 5.8 (Python 3.9) cannot do, for the panel and the install dialog."""
    if tuple(python[:2]) >= (3, 10):
        return None
    return (
        f"Slicer 5.8 runs Python {python[0]}.{python[1]}, for which PyTorch "
        f"{package_torch_requirement().lstrip('>=')} or newer does not exist: fastsam3d then "
        "refuses to unpickle .pth weights (older PyTorch can be tricked into running code "
        "from them), so only .safetensors checkpoints load here. Slicer 5.10 or newer "
        "loads the downloadable weights."
    )


def torch_requirement() -> Requirement:
    return Requirement("torch", torch_spec(), _installed("torch"))


def pip_requirements() -> list[Requirement]:
    return [Requirement(n, s, _installed(n)) for n, s in map(parse, PIP_REQUIREMENTS)]


def missing() -> list[Requirement]:
    """Requirements not satisfied now, torch first."""
    return [r for r in [torch_requirement(), *pip_requirements()] if not r.satisfied]


def plan_text(reqs: list[Requirement]) -> str:
    """What the first-use dialog tells the user before anything is installed."""
    lines = ["FastSAM3D needs these Python packages, which are not installed yet:", ""]
    for r in reqs:
        have = f" (installed: {r.installed})" if r.installed else ""
        how = (
            "through the PyTorch extension, which picks the build that matches your GPU driver"
            if r.name == "torch"
            else "with pip"
        )
        lines.append(f"  - {r.text}{have}: {how}")
    if not any(r.name == "torch" for r in reqs):  # e.g. the remote / ONNX backends
        lines += [
            "",
            "pip downloads a few MB to a few tens of MB; PyTorch is not part of this installation.",
        ]
        return "\n".join(lines)
    lines += [
        "",
        "This downloads several hundred MB to a few GB (PyTorch with CUDA) and may take "
        "minutes. Slicer may need to restart afterwards; the installation then resumes "
        "when you open this module again.",
    ]
    note = python39_note()
    if note:
        lines += ["", note]
    return "\n".join(lines)


def bundled_fastsam3d_dir() -> Path | None:
    """The directory holding the fastsam3d package this module was built with.

    The packaged extension installs it next to this module's own package (the scripted-module
    directory); in a source checkout it is ``<repo>/model/src``.
    """
    module_dir = Path(__file__).resolve().parents[1]
    for candidate in (module_dir, module_dir.parent / "model" / "src"):
        if (candidate / "fastsam3d" / "__init__.py").is_file():
            return candidate
    return None


def prefer_bundled_fastsam3d() -> str | None:
    """Make ``import fastsam3d`` find the bundled package, not a pip-installed one (m13).

    Slicer appends scripted-module directories to ``sys.path``, after site-packages, so a
    ``pip install fastsam3d`` in Slicer's Python would otherwise win. Puts the bundled
    directory first. Returns a warning for the user when another fastsam3d was already
    imported in this session (it cannot be swapped safely; a restart fixes it), else None.
    """
    bundled = bundled_fastsam3d_dir()
    if bundled is None:
        return None
    path = str(bundled)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    loaded = sys.modules.get("fastsam3d")
    origin = getattr(loaded, "__file__", None)
    if loaded is not None and origin and not Path(origin).resolve().is_relative_to(bundled):
        return (
            f"Another fastsam3d package ({origin}) was imported before FastSAM3D's own "
            f"({bundled / 'fastsam3d'}); restart Slicer so that the module uses its own."
        )
    return None
