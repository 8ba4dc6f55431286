"""Prompt encoder: points (and, for box-aware weights, boxes) plus the low-res mask prompt.

Quirks of the released weights, reproduced on purpose (they were trained this way):

* point coordinates get +0.5 (voxel centre) and are used in the order given, (dim0, dim1, dim2);
* the dense positional grid stacks its coordinates as (dim1, dim0, dim2) (a 2D-SAM carry-over);
* the Fourier features are [sin, cos, sin] (384 = 3 x 128 channels);
* without a box, one padding point (label -1) is appended.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm3d, patch_conv, using_reference_kernels


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of normalised 3D coordinates."""

    def __init__(self, num_pos_feats: int = 128, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats))
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        s, c = torch.sin(coords), torch.cos(coords)
        return torch.cat([s, c, s], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense PE of a grid, (C, X, Y, Z); coordinate order (dim1, dim0, dim2)."""
        x, y, z = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((x, y, z), device=device, dtype=torch.float32)
        along0 = (grid.cumsum(dim=0) - 0.5) / y
        along1 = (grid.cumsum(dim=1) - 0.5) / x
        along2 = (grid.cumsum(dim=2) - 0.5) / z
        pe = self._pe_encoding(torch.stack([along1, along0, along2], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int, int]
    ) -> torch.Tensor:
        """PE of points given in voxel units of an image of ``image_size``."""
        if len(set(image_size)) == 1:
            # Same division, but no host-to-device copy: CUDA-graph capture forbids one.
            return self._pe_encoding(coords.float() / float(image_size[0]))
        norm = torch.tensor(image_size, dtype=torch.float32, device=coords.device)
        return self._pe_encoding(coords.float() / norm)


class PromptEncoder3D(nn.Module):
    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: tuple[int, int, int] = (8, 8, 8),
        input_image_size: tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
        num_point_embeddings: int = 2,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # 2 in the released weights (negative, positive); 4 adds the two box corners.
        self.num_point_embeddings = num_point_embeddings
        self.point_embeddings = nn.ModuleList(
            [nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings)]
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def supports_boxes(self) -> bool:
        return self.num_point_embeddings >= 4

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, 8, 8, 8) positional encoding of the image-embedding grid.

        A pure function of the Gaussian matrix, so it is cached (keyed on that buffer's identity,
        version and device) instead of recomputing 196k sin/cos per click.
        """
        g = self.pe_layer.positional_encoding_gaussian_matrix
        # Inference tensors (a model built under inference_mode) have no version counter.
        key = (g.data_ptr(), -1 if g.is_inference() else g._version, g.device, g.dtype)
        if using_reference_kernels():
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        if getattr(self, "_dense_pe_key", None) != key or torch.is_grad_enabled():
            pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            if torch.is_grad_enabled():
                return pe
            self._dense_pe, self._dense_pe_key = pe, key
        return self._dense_pe

    def _downscale_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """``mask_downscaling`` with its two stride-2 convs as exact GEMMs (see patch_conv)."""
        m = self.mask_downscaling
        x = m[2](m[1](patch_conv(masks, m[0])))
        x = m[5](m[4](patch_conv(x, m[3])))
        return patch_conv(x, m[6])

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5
        if pad:
            b = points.shape[0]
            points = torch.cat([points, points.new_zeros(b, 1, 3)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(b, 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        if not self.supports_boxes:
            raise ValueError(
                "these weights have no box embeddings (the released FastSAM3D/SAM-Med3D have 2 "
                "point embeddings); use a box to place the crop, or box-aware weights from distill/"
            )
        corners = (boxes + 0.5).reshape(-1, 2, 3)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        emb = torch.stack(
            [
                emb[:, 0] + self.point_embeddings[2].weight[0],
                emb[:, 1] + self.point_embeddings[3].weight[0],
            ],
            dim=1,
        )
        return emb

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sparse (B, N, C), dense (B, C, 8, 8, 8)) embeddings.

        Every reference loop passes a mask (zeros on the first click), so ``masks=None``
        (``no_mask_embed``) is a different input from a zero mask.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self._downscale_mask(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse, dense
