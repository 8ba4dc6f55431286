"""Dependency floors that decide safety, in one torch-free place (the Slicer module reads them
on Python 3.9 before torch is installed; ``model/pyproject.toml`` states the same floor).

torch: ``torch.load(weights_only=True)`` is only as safe as the torch that runs it.

* GHSA-53q9-r3pm-6pq6 / CVE-2025-32434: ``weights_only=True`` could be bypassed to run code
  (torch <= 2.5.1, fixed in 2.6.0).
* GHSA-63cw-57p8-fm3p / CVE-2026-24747: the weights-only unpickler let SETITEM/SETITEMS on
  non-dicts and storage sizes that disagree with the archive corrupt memory (torch <= 2.9.1,
  fixed in 2.10.0). This is the advisory that sets the floor.
* CVE-2026-4538 (PYSEC-2026-139, torch 2.10.0) concerns ``.pt2`` archives (``torch.export``),
  which fastsam3d never loads; it does not touch ``torch.load``.

torch 2.10 has no wheels for Python 3.9 (the newest for 3.9 is 2.8.0), so on Slicer 5.8 the
floor cannot be met: there :func:`fastsam3d.checkpoint.read_checkpoint` refuses pickled
checkpoints (``.pth``) and reads only safetensors, which involve no unpickler at all.
"""

from __future__ import annotations

import re

#: pip-style floor for torch (``deps.py`` / PyTorchUtils ``torchVersionRequirement`` format).
TORCH_REQUIREMENT = ">=2.10"
#: the same floor as a tuple, and the advisory that decides it
TORCH_PICKLE_SAFE = (2, 10)
TORCH_ADVISORY = "GHSA-63cw-57p8-fm3p (CVE-2026-24747), fixed in torch 2.10.0"


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.10.0+cpu"`` -> ``(2, 10, 0)``; stops at the first non-numeric part (``"2.11.0a0"``
    -> ``(2, 11, 0)``)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    return tuple(parts)


def torch_loads_pickles_safely(version: str | None = None) -> bool:
    """Whether this torch (or ``version``) is at or above the floor for ``weights_only`` loads."""
    if version is None:
        import torch

        version = torch.__version__
    return version_tuple(str(version)) >= TORCH_PICKLE_SAFE
