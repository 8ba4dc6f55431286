"""Sam3D: the container of the three parts, under the official key prefixes."""

from __future__ import annotations

import torch
from torch import nn

from ..configs import ModelConfig
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """Holds ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``.

    Callers use the three parts directly (SAM style); :meth:`predict` is the one-call path
    for a single crop. The ImageNet ``pixel_mean``/``pixel_std`` of the reference wrapper are
    left out: no pipeline used them and they are not in the checkpoints.
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def predict(
        self,
        image_embeddings: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass: prompt encoder + mask decoder -> (low_res_logits, iou)."""
        return decode(self, image_embeddings, coords, labels, mask_input, multimask_output)


def decode(
    model: nn.Module,
    image_embeddings: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_input: torch.Tensor | None,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder of any model with the SAM-style parts (``prompt_encoder``,
    ``mask_decoder``): the one click implementation that Sam3D, the Runner and test stubs share."""
    pe = model.prompt_encoder
    sparse, dense = pe(points=(coords, labels), boxes=None, masks=mask_input)
    return model.mask_decoder(
        image_embeddings=image_embeddings,
        image_pe=pe.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )
