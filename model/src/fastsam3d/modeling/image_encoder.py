"""ViT image encoder for 128^3 crops: one class for FastSAM3D and SAM-Med3D.

The two released models differ only in configuration:

* depth, heads, window size / global blocks (SAM-Med3D: 12 blocks, window 14 except blocks
  2, 5, 8, 11; FastSAM3D: 6 blocks, all global);
* ``num_attn_free_blocks``: FastSAM3D's first two blocks have no attention (LN + MLP only);
* ``block_style``: ``"fastsam3d"`` computes ``n = norm2(h); out = n + mlp(n)`` (the residual
  is taken from the normalised stream, as in every FastSAM3D encoder file and its Slicer plugin),
  ``"standard"`` computes ``out = h + mlp(norm2(h))`` (SAM-Med3D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import Attention, window_partition3d, window_unpartition3d
from .common import LayerNorm3d, MLPBlock, patch_conv, using_reference_kernels

BLOCK_STYLES = ("fastsam3d", "standard")
ENCODER_LN_EPS = 1e-6


def _mlp_residual(style: str, h: torch.Tensor, norm2: nn.Module, mlp: nn.Module) -> torch.Tensor:
    if style == "fastsam3d":
        n = norm2(h)
        return n + mlp(n)
    return h + mlp(norm2(h))


class AttentionFreeBlock(nn.Module):
    """FastSAM3D's leading blocks: only ``norm2`` and ``mlp`` (no ``norm1``/``attn`` keys)."""

    def __init__(self, dim: int, mlp_ratio: float, block_style: str) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.block_style = block_style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mlp_residual(self.block_style, x, self.norm2, self.mlp)


class Block3D(nn.Module):
    """Pre-norm transformer block with windowed or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        block_style: str,
        window_size: int,
        grid: tuple[int, int, int],
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        attn_size = (window_size,) * 3 if window_size > 0 else grid
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.block_style = block_style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        ws = self.window_size
        size = tuple(x.shape[1:4])
        if ws > 0 and self.attn.backend != "einsum" and ws >= max(size):
            # One window holds the whole (padded) grid: exact closed form, real queries only.
            x = self.attn(x, pad_to=ws)
        elif ws > 0:
            windows, padded = window_partition3d(x, ws)
            x = window_unpartition3d(self.attn(windows), ws, padded, size)
        else:
            x = self.attn(x)
        return _mlp_residual(self.block_style, shortcut + x, self.norm2, self.mlp)


class PatchEmbed3D(nn.Module):
    """16^3 patches -> tokens, laid out channels-last (B, D, H, W, C).

    Under autocast or in bf16 (the fast paths) the stride-16 convolution runs as the equivalent
    GEMM over non-overlapping patches: same math, but oneDNN's bf16 path for this kernel shape
    is ~20x slower than a bf16 matmul on CPU, and on GPU the GEMM is as fast as cuDNN.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain_fp32 = x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        if plain_fp32 or using_reference_kernels():
            return self.proj(x).permute(0, 2, 3, 4, 1)
        return patch_conv(x, self.proj).permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """(B, 1, 128, 128, 128) crop -> (B, out_chans, 8, 8, 8) embedding.

    ``forward(x, return_taps=True)`` also returns each block's output (B, 8, 8, 8, C), for
    distillation; the plain call always returns one tensor (the public FastSAM3D encoder returned
    a list, which broke its own wrapper).
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        num_attn_free_blocks: int = 0,
        block_style: str = "standard",
    ) -> None:
        super().__init__()
        if block_style not in BLOCK_STYLES:
            raise ValueError(f"block_style must be one of {BLOCK_STYLES}, got {block_style!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.img_size = img_size
        g = img_size // patch_size
        self.grid = (g, g, g)
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, embed_dim)) if use_abs_pos else None
        blocks: list[nn.Module] = []
        for i in range(depth):
            if i < num_attn_free_blocks:
                blocks.append(AttentionFreeBlock(embed_dim, mlp_ratio, block_style))
            else:
                ws = 0 if i in global_attn_indexes else window_size
                blocks.append(
                    Block3D(
                        embed_dim,
                        num_heads,
                        mlp_ratio,
                        block_style,
                        ws,
                        self.grid,
                        qkv_bias,
                        use_rel_pos,
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(
        self, x: torch.Tensor, return_taps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        taps: list[torch.Tensor] = []
        for blk in self.blocks:
            x = blk(x)
            if return_taps:
                taps.append(x)
        out = self.neck(x.permute(0, 4, 1, 2, 3))
        return (out, taps) if return_taps else out
