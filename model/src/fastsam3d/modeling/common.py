"""Layers shared by the encoder, the prompt encoder and the decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_REFERENCE_KERNELS = False


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Run the plain kernels the public code uses (convolutions, uncached PE) instead of our
    exact GEMM rewrites, so benchmarks can time the reference's way in the same process."""
    global _REFERENCE_KERNELS
    previous, _REFERENCE_KERNELS = _REFERENCE_KERNELS, enabled
    try:
        yield
    finally:
        _REFERENCE_KERNELS = previous


def using_reference_kernels() -> bool:
    return _REFERENCE_KERNELS


def click_rewrites(x: torch.Tensor) -> bool:
    """Whether the decoder's exact CPU rewrites (folded cross attention, upscaling as GEMMs) run
    for ``x``: on the CPU only. On an H200 they made the click slower (0.76 -> 0.94 ms, fast
    path; docs/benchmarks.md), so CUDA keeps the plain forms it was measured with; the reference
    kernels and the ONNX export keep them too."""
    return x.device.type == "cpu" and not _REFERENCE_KERNELS


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor.

    The official weights use eps 1e-6 here (the transformer's nn.LayerNorm keeps 1e-5).
    Computed as F.layer_norm on a channels-last view: one fused kernel instead of five ops.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class MLPBlock(nn.Module):
    """Two linear layers with an activation; `lin1`/`lin2` are the official key names."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def patch_conv(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A Conv3d whose kernel equals its stride (non-overlapping patches), as one GEMM.

    Same sums as the convolution; oneDNN/ATen fall back to slow kernels for these shapes on CPU
    (``slow_conv3d`` for the tiny mask-prompt convs, a ~20x slower bf16 path for 16^3 patches).
    Returns channels-first (B, C_out, D', H', W') like the convolution.
    """
    if _REFERENCE_KERNELS:
        return conv(x)
    k = conv.kernel_size
    b, c, d, h, w = x.shape
    g = (d // k[0], h // k[1], w // k[2])
    patches = x.reshape(b, c, g[0], k[0], g[1], k[1], g[2], k[2]).permute(0, 2, 4, 6, 1, 3, 5, 7)
    out = F.linear(
        patches.reshape(b, *g, -1), conv.weight.reshape(conv.out_channels, -1), conv.bias
    )
    return out.permute(0, 4, 1, 2, 3)
