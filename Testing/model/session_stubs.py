"""A stand-in network with the SAM-style API whose 'segmentation' is a threshold of the crop.

Used where the point is the session's logic (tiling, caching, prompts, paste-back), which a
fixture network cannot show because its masks are not segmentations. It records every call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Encoder(nn.Module):
    def __init__(self, owner: ThresholdModel) -> None:
        super().__init__()
        self._owner = [owner]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._owner[0].encoder_calls += 1
        return x.clone()


class _Prompt(nn.Module):
    def __init__(self, owner: ThresholdModel) -> None:
        super().__init__()
        self._owner = [owner]

    def get_dense_pe(self) -> torch.Tensor:
        return torch.zeros(1, 1, 8, 8, 8)

    def forward(self, points, boxes, masks):
        coords, labels = points
        self._owner[0].prompts.append(
            (coords.clone(), labels.clone(), None if masks is None else masks.clone())
        )
        return (coords, labels), masks


class _Decoder(nn.Module):
    def forward(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output,
    ):
        x = image_embeddings
        pooled = F.avg_pool3d(x, 4)
        mid = (x.amin() + x.amax()) / 2
        return pooled - mid, torch.ones(x.shape[0], 1)


class ThresholdModel(nn.Module):
    """Logits = (4x4x4 mean of the normalised crop) - (midpoint of its range)."""

    config = None

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.encoder_calls = 0
        self.prompts: list = []
        self.image_encoder = _Encoder(self)
        self.prompt_encoder = _Prompt(self)
        self.mask_decoder = _Decoder()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)
