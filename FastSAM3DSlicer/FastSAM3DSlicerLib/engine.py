"""The bridge to the ``fastsam3d`` package: find it, load a network once, make sessions.

``fastsam3d`` (and torch) are imported only inside functions, at first use, never when Slicer
loads the module: torch may not be installed yet, and importing it costs seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

LOCAL_FILE = "local-file"


def ensure_fastsam3d_importable() -> str | None:
    """Make ``import fastsam3d`` find the package this module was built with.

    The built extension installs it beside this module, a source checkout has it in
    <repo>/model/src (one source of truth; nothing is copied into the module's sources). That
    directory goes first on ``sys.path``: Slicer appends scripted-module directories after
    site-packages, so a pip-installed ``fastsam3d`` would otherwise shadow ours (review m13).
    Returns a warning for the user when another ``fastsam3d`` was already imported (a restart
    fixes it), else None.
    """
    from .deps import prefer_bundled_fastsam3d

    warning = prefer_bundled_fastsam3d()
    if importlib.util.find_spec("fastsam3d") is None:
        raise ImportError(
            "the fastsam3d package is missing: reinstall the FastSAM3DSlicer extension, or in a "
            "source checkout keep FastSAM3DSlicer/ next to model/src/fastsam3d"
        )
    return warning


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cuda:0", "cpu", "mps"
    description: str  # for the panel, e.g. "NVIDIA RTX 4090 (24 GB)"
    is_cpu: bool


def describe_device(device: Any) -> DeviceInfo:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        gib = props.total_memory / 2**30
        return DeviceInfo(f"cuda:{index}", f"{props.name} ({gib:.0f} GiB)", False)
    if dev.type == "mps":
        return DeviceInfo("mps", "Apple GPU (MPS)", False)
    return DeviceInfo("cpu", f"CPU ({torch.get_num_threads()} threads)", True)


class RunnerEngine:
    """What every local engine shares: one prepared runner (``self.runner``) and the session
    options, made into one ``fastsam3d.Session`` per segment. Subclasses set ``_fastsam3d``,
    ``runner``, ``session_options`` and ``_warmed``."""

    _fastsam3d: Any
    runner: Any
    session_options: dict
    _warmed: bool

    def new_session(self) -> Any:
        # Warming up (cuDNN plans, allocator) once per network is enough; later sessions reuse it.
        session = self._fastsam3d.Session(
            self.runner, warmup=not self._warmed, **self.session_options
        )
        self._warmed = True
        return session

    def make_volume(self, array_kji: Any, ijk_to_ras: Any) -> Any:
        return self._fastsam3d.Volume(array_kji, ijk_to_ras)


class FastSAM3DEngine(RunnerEngine):
    """One loaded network shared by all sessions; every method runs on the worker thread."""

    def __init__(self, model: Any, device: Any, **session_options: Any) -> None:
        import fastsam3d
        from fastsam3d.fastpath import Runner

        self._fastsam3d = fastsam3d
        self.model = model
        self.device_info = describe_device(device)
        self.device = self.device_info.name
        self._warmed = False
        # One prepared runner (bf16 encoder copy, CUDA graphs) shared by every per-segment
        # session, instead of each session preparing its own.
        self.runner = Runner(model, device, precision=session_options.pop("precision", "auto"))
        self.session_options = session_options  # e.g. max_crops, propagate (fastsam3d.Session)

    @classmethod
    def load(
        cls, weights: str, device: str = "auto", local_path: str | None = None
    ) -> FastSAM3DEngine:
        """Load registry weights (already downloaded) or a local checkpoint file."""
        ensure_fastsam3d_importable()
        import fastsam3d
        from fastsam3d import hub
        from fastsam3d.device import resolve_device
        from fastsam3d.weights import get_weights

        dev = resolve_device(device)
        if weights == LOCAL_FILE:
            if not local_path:
                raise ValueError("choose a checkpoint file for 'Local file'")
            model = fastsam3d.load_model(local_path, device=dev)
        else:
            path = hub.cached_path(weights)  # re-hashed against the recorded SHA-256
            if path is None:
                raise FileNotFoundError(
                    f"the {weights!r} weights are not downloaded yet; press Download first"
                )
            config = get_weights(weights).config
            model = fastsam3d.load_model(path, device=dev, config=config)
        return cls(model, dev)

    @classmethod
    def from_model(cls, model: Any, device: str = "cpu", **session_options: Any) -> FastSAM3DEngine:
        """Wrap an already built network (tests use the fixture-weight network)."""
        ensure_fastsam3d_importable()
        from fastsam3d.device import resolve_device

        return cls(model, resolve_device(device), **session_options)
