"""Which torch device to run on: ``"auto"`` resolution and the CPU's native-bf16 probe.

Torch-dependent but model-free, so the Session, the Runner, the CLI and the Slicer engine share
one answer without importing the Runner.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run natively on this CPU (AMX tiles or AVX512-BF16).

    The probes live in ``torch.cpu`` (private, so looked up defensively; older releases had
    them under ``torch._C._cpu``). Without them bf16 is emulated and slower than fp32.
    """
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            fn = getattr(module, probe, None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    if fn():
                        return True
    return False


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else MPS, else CPU; explicit names are checked."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available to torch")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise RuntimeError("device 'mps' requested but MPS is not available")
    return dev
