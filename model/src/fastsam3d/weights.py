"""Named downloadable weights: which published checkpoints exist, where, and which network
config each runs with.

The registry of weights, as timm keeps its pretrained configs apart from its hub code: this module
says *what* can be downloaded (name, URL, file name, pinned SHA-256 if any, the
:mod:`fastsam3d.configs` config), :mod:`fastsam3d.hub` *how* (per-user cache, hash records,
verified downloads). Torch-free: the Slicer module lists the weights before torch is installed.

Registry names follow :mod:`fastsam3d.configs`' pattern: ``WEIGHTS`` (a public dict),
:func:`list_weights`, :func:`get_weights`. Every entry's ``config`` must be a registered config:
a typo fails at import, not at the first download.
"""

from __future__ import annotations

import dataclasses

from .configs import CONFIGS

__all__ = ["WEIGHTS", "WeightsInfo", "get_weights", "list_weights"]

_TURBO_URL = "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"
_TURBO_LICENSE = (
    "Published by the SAM-Med3D authors (github.com/uni-medical/SAM-Med3D); check "
    "that repository's terms before redistribution. Research use; not a medical device."
)


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """One downloadable checkpoint.

    Attributes:
        name: The registry name (``fastsam3d download NAME``, ``load_model(NAME)``).
        url: Where the file is downloaded from.
        filename: The file's name in the cache; two entries may share one file (one download,
            one hash record).
        config: The name of the :data:`fastsam3d.configs.CONFIGS` entry the weights run with.
        description: One line for listings.
        license_note: Who published the weights and on what terms.
        sha256: A pinned SHA-256 (64 hex digits), or None: then the first download is trusted
            and recorded (see :mod:`fastsam3d.hub`).
    """

    name: str
    url: str
    filename: str
    config: str
    description: str
    license_note: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            known = ", ".join(CONFIGS)
            raise ValueError(
                f"weights {self.name!r} name config {self.config!r}, which is not registered "
                f"(known configs: {known})"
            )


WEIGHTS: dict[str, WeightsInfo] = {
    info.name: info
    for info in (
        WeightsInfo(
            name="fastsam3d",
            url="https://huggingface.co/techlove/FastSAM3D/resolve/main/FastSAM3D.pth",
            filename="FastSAM3D.pth",
            config="fastsam3d",
            description="FastSAM3D: 6-block distilled encoder + SAM-Med3D prompt encoder/decoder",
            license_note=(
                "Published by the FastSAM3D authors (github.com/arcadelab/FastSAM3D); no licence "
                "for the weights is stated there. Research use; not a medical device."
            ),
        ),
        WeightsInfo(
            name="sam-med3d-turbo",
            url=_TURBO_URL,
            filename="sam_med3d_turbo.pth",
            config="sam-med3d-turbo",
            description="SAM-Med3D-turbo: 12-block ViT-B encoder (FastSAM3D's teacher)",
            license_note=_TURBO_LICENSE,
        ),
        WeightsInfo(
            # The same file as "sam-med3d-turbo" (one download, one record), run through
            # FastSAM3D's block, as FastSAM3D's teacher and its Slicer plugin did.
            name="sam-med3d-turbo-fastsam3d-block",
            url=_TURBO_URL,
            filename="sam_med3d_turbo.pth",
            config="sam-med3d-turbo-fastsam3d-block",
            description="SAM-Med3D-turbo weights run with FastSAM3D's block (shares the "
            "sam-med3d-turbo file: downloading or removing one is the other)",
            license_note=_TURBO_LICENSE,
        ),
    )
}


def list_weights() -> list[WeightsInfo]:
    """All registered weights, in registration order (FastSAM3D first)."""
    return list(WEIGHTS.values())


def get_weights(name: str) -> WeightsInfo:
    """The registry entry ``name``; unknown names raise ValueError listing the known ones."""
    try:
        return WEIGHTS[name]
    except KeyError:
        known = ", ".join(sorted(WEIGHTS))
        raise ValueError(f"unknown weights name {name!r}; known names: {known}") from None
