"""Mask decoder: tokens + image embedding -> 32^3 low-res mask logits and IoU predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, click_rewrites
from .transformer import TwoWayTransformer3D

# Input voxels per block of the CPU upscaling (see MaskDecoder3D._masks_by_gemm): a block's
# largest intermediate, 128 x 64 x 48 fp32 = 1.5 MB, stays in a core's L2 cache. Measured on
# 2 threads (docs/benchmarks.md): 128-256 beat one block of 512 by ~1 ms, 32 is slower.
CPU_UPSCALE_VOXELS = 128


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (``layers.{i}`` keys)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder3D(nn.Module):
    """Tokens + image embedding -> low-res mask logits and IoU predictions.

    ``gemm_upscaling`` (default on; off in the ONNX export and under
    :func:`~fastsam3d.modeling.common.reference_kernels`): see :meth:`_masks_by_gemm`.
    """

    def __init__(
        self,
        transformer_dim: int = 384,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer or TwoWayTransformer3D(embedding_dim=transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        self.gemm_upscaling = True

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (low_res_logits (B, C, 32, 32, 32), iou (B, C)), C = 3 if multimask else 1."""
        sl = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, sl
        )
        return masks, iou[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_slice: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All IoU predictions, and masks only for the tokens in ``mask_slice`` (a single-mask
        click needs one hypernetwork and one product, not four)."""
        bt = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [
                out_tokens.unsqueeze(0).expand(bt, -1, -1).to(sparse_prompt_embeddings.dtype),
                sparse_prompt_embeddings,
            ],
            dim=1,
        )
        src = image_embeddings
        if src.shape[0] != bt:
            src = torch.repeat_interleave(src, bt, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, bt, dim=0)
        b, c, x, y, z = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        wanted = range(self.num_mask_tokens)[mask_slice]
        if self.gemm_upscaling and click_rewrites(src):
            hyper_in = self._hyper_in(mask_tokens_out, wanted)
            masks = self._masks_by_gemm(src, hyper_in, (x, y, z))
            return masks, self.iou_prediction_head(iou_token_out)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = self._hyper_in(mask_tokens_out, wanted)
        b, c, x, y, z = upscaled.shape
        # The final logits in fp32 even under autocast (the fast paths): they are thresholded
        # and fed back as the next click's mask prompt.
        with torch.autocast(upscaled.device.type, enabled=False):
            masks = hyper_in.float() @ upscaled.reshape(b, c, x * y * z).float()
        masks = masks.reshape(b, -1, x, y, z)
        return masks, self.iou_prediction_head(iou_token_out)

    def _hyper_in(self, mask_tokens_out: torch.Tensor, wanted: range) -> torch.Tensor:
        """(B, len(wanted), C/8) hypernetwork weights of the wanted mask tokens."""
        return torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in wanted], dim=1
        )

    def _masks_by_gemm(
        self, src: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product on (voxel, channel) rows.

        A transposed convolution whose kernel equals its stride maps each input voxel to its
        own 2x2x2 output block: one GEMM (N, C_in) x (C_in, 8 C_out) with the bias repeated.
        Every later step is per voxel (LayerNorm over channels, GELU, the second such
        convolution, the product with the hypernetwork's weights), so the rows stay in
        (voxel, i, j, l, i', j', l') order, channels contiguous (no 5-D layout copies, no
        slow_conv_transpose3d), and only the (N 64, masks) logits are put in grid order.
        Same sums as the convolutions, in another order. On a CPU the voxels go in blocks of
        ``CPU_UPSCALE_VOXELS`` so that each block's 64x larger intermediates stay in cache.
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        w1, b1 = _gemm_weight(conv1), conv1.bias.repeat(8)
        w2, b2 = _gemm_weight(conv2), conv2.bias.repeat(8)
        hyper_t = hyper_in.float().transpose(1, 2)  # (B, C/8, masks)
        b, n, _ = src.shape
        step = CPU_UPSCALE_VOXELS
        parts = []
        for i in range(b):
            for s in range(0, n, step):
                h = torch.addmm(b1, src[i, s : s + step], w1).reshape(-1, norm.weight.shape[0])
                h = act1(F.layer_norm(h, norm.weight.shape, norm.weight, norm.bias, norm.eps))
                h = act2(torch.addmm(b2, h, w2)).reshape(-1, hyper_t.shape[1])
                # fp32 logits even under autocast (see predict_masks)
                with torch.autocast(h.device.type, enabled=False):
                    parts.append(h.float() @ hyper_t[i])  # (voxels 64, masks)
        masks = torch.cat(parts)
        x, y, z = grid
        masks = masks.reshape(b, x, y, z, 2, 2, 2, 2, 2, 2, -1)
        masks = masks.permute(0, 10, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return masks.reshape(b, -1, 4 * x, 4 * y, 4 * z)


def _gemm_weight(conv: nn.ConvTranspose3d) -> torch.Tensor:
    """A kernel-2, stride-2 ConvTranspose3d's weight (C_in, C_out, 2, 2, 2) as the
    (C_in, 8 C_out) matrix whose columns run over (i, j, l, C_out)."""
    w = conv.weight
    return w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
