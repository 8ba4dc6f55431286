"""Encoder self-attention with decomposed 3D relative positions, behind one backend switch.

Backends (all compute the same function of the weights):

* ``"einsum"``: explicit ``q @ k^T`` + rel-pos + softmax, and SAM-Med3D's windowed blocks are
  zero-padded to the window exactly as the public code does (2744 tokens for 8^3 in 14^3).
  This is the reference the other backends are tested against.
* ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` with the rel-pos bias as an additive
  mask; padded windows use the closed form below, so only the 512 real queries are computed.
* ``"fold"``: SDPA with *no* mask: the rel-pos bias folded into extra q/k dimensions (see
  :func:`~.rel_pos.fold_rel_pos`), so the fused flash/cuDNN kernels without bias support apply.
* ``"flex"``: FlexAttention with the rel-pos terms in a ``score_mod`` (see ``sparse``).
* ``"sparse"``: the 3D block-sparse pattern (local blocks + dilated strides) of
  the experimental ``sparse`` subpackage; a research option, the official weights were trained
  dense.

Padded-window closed form. With window 14 on an 8^3 grid the reference pads the *normed* tokens
with zeros to 14^3, so every padded key is ``k = b_k`` and every padded value ``v = b_v`` (the qkv
bias) and they are not masked. A real query's logit for a padded key is ``q.b_k*scale + bias``,
and the rel-pos bias (see :func:`~.rel_pos.dense_bias` for its exact form) factorises per key-w
index, so the summed exponentials of all 2232 padded keys have a closed form. They collapse into
ONE extra key ``b_k`` with value ``b_v`` and additive bias ``log(sum_padded exp(bias))``: exact,
513 keys instead of 2744, and no padded queries at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import sparse
from .rel_pos import (
    Grid,
    dense_bias,
    fold_rel_pos,
    padded_key_bias,
    rel_pos_terms,
    rel_pos_terms_window,
)

DEFAULT_BACKEND = "sdpa"


class Attention(nn.Module):
    """Multi-head self-attention over a 3D token grid with decomposed relative positions.

    Parameter names (``qkv``, ``proj``, ``rel_pos_d/h/w``) are the official ones.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: Grid = (8, 8, 8),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.input_size = input_size
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))
        self.backend = DEFAULT_BACKEND
        self.sparse_pattern = None  # set by set_attention_backend(..., pattern=...)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rel_pos_d, self.rel_pos_h, self.rel_pos_w

    def forward(self, x: torch.Tensor, pad_to: int = 0) -> torch.Tensor:
        """x: (B, D, H, W, C). ``pad_to`` > 0 means: behave as if the tokens had been
        zero-padded to a ``pad_to``^3 window (SAM-Med3D's windowed blocks), exactly."""
        b, d, h, w, c = x.shape
        grid = (d, h, w)
        n = d * h * w
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd)

        if pad_to:
            out = self._padded_window(q, k, v, grid, pad_to)
        else:
            try:
                kernel = _KERNELS[self.backend]
            except KeyError:
                raise ValueError(
                    f"unknown attention backend {self.backend!r}; use one of {BACKENDS}"
                ) from None
            out = kernel(self, q, k, v, grid)
        out = out.transpose(1, 2).reshape(b, d, h, w, c)
        return self.proj(out)

    def _padded_window(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, pad_to: int
    ) -> torch.Tensor:
        """Exact attention of the real tokens in a zero-padded ``pad_to``^3 window (see module
        docstring): the padded keys collapse into one extra key carrying their total mass."""
        b, nh, n, hd = q.shape
        full = (pad_to, pad_to, pad_to)
        if self.qkv.bias is not None:
            b_q, b_k, b_v = self.qkv.bias.reshape(3, nh, hd).to(q.dtype)
        else:
            b_q = b_k = b_v = q.new_zeros(nh, hd)
        k_all = torch.cat([k, b_k[None, :, None, :].expand(b, nh, 1, hd)], dim=2)
        v_all = torch.cat([v, b_v[None, :, None, :].expand(b, nh, 1, hd)], dim=2)
        if self.use_rel_pos:
            t_d, t_h, t_w = rel_pos_terms_window(q, self._tables(), grid, full, b_q)
            gd, gh, gw = grid
            real_terms = (t_d[..., :gw], t_h[..., :gd, :gw], t_w[..., :gh, :gw])
            bias = torch.cat(
                [
                    dense_bias(real_terms),
                    padded_key_bias((t_d, t_h, t_w), grid).to(q.dtype)[..., None],
                ],
                dim=-1,
            )
        else:
            n_pad = math.prod(full) - n
            bias = torch.zeros(b, nh, n, n + 1, dtype=q.dtype, device=q.device)
            bias[..., -1] = math.log(n_pad)
        if self.backend == "einsum":
            attn = (q * self.scale) @ k_all.transpose(-2, -1) + bias
            return attn.softmax(dim=-1) @ v_all
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias, scale=self.scale)


# ----------------------------------------------------------------------------- backends
# kernel(layer, q, k, v, grid): q, k, v (B, heads, N, hd) in raster order of grid -> the same
# shape. One entry per backend name; set_attention_backend checks names against BACKENDS.


def _terms(layer: Attention, q: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, ...] | None:
    return rel_pos_terms(q, layer._tables(), grid, grid) if layer.use_rel_pos else None


def _einsum(
    layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid
) -> torch.Tensor:
    """The reference: explicit logits + rel-pos bias + softmax."""
    attn = (q * layer.scale) @ k.transpose(-2, -1)
    if layer.use_rel_pos:
        attn = attn + dense_bias(rel_pos_terms(q, layer._tables(), grid, grid))
    return attn.softmax(dim=-1) @ v


def _sdpa(
    layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid
) -> torch.Tensor:
    bias = None
    if layer.use_rel_pos:
        bias = dense_bias(rel_pos_terms(q, layer._tables(), grid, grid)).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=layer.scale)


def _fold(
    layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid
) -> torch.Tensor:
    """SDPA without a mask; folding needs rel-pos on a cubic grid, else this is ``sdpa``."""
    if not (layer.use_rel_pos and len(set(grid)) == 1):
        return _sdpa(layer, q, k, v, grid)
    return fold_rel_pos(q, k, v, rel_pos_terms(q, layer._tables(), grid, grid), layer.scale)


def _flex(
    layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid
) -> torch.Tensor:
    return sparse.flex_dense(q, k, v, _terms(layer, q, grid), layer.scale, grid)


def _sparse(
    layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid
) -> torch.Tensor:
    """Experimental (:mod:`fastsam3d.modeling.sparse`): the official weights are dense."""
    return sparse.sparse_attention(
        q, k, v, _terms(layer, q, grid), layer.scale, grid, layer.sparse_pattern
    )


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "einsum": _einsum,
    "sdpa": _sdpa,
    "fold": _fold,
    "flex": _flex,
    "sparse": _sparse,
}
BACKENDS = tuple(_KERNELS)  # ("einsum", "sdpa", "fold", "flex", "sparse")


def set_attention_backend(model: nn.Module, backend: str, pattern: object = None) -> nn.Module:
    """Switch every encoder attention layer to ``backend`` (see this module's docstring).

    ``pattern`` is a ``SparsePattern`` for the ``"sparse"`` backend (None = its default).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
    if backend == "sparse" and pattern is None:
        pattern = sparse.SparsePattern()
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
            m.sparse_pattern = pattern
    return model


def window_partition3d(x: torch.Tensor, window: int) -> tuple[torch.Tensor, Grid]:
    """Zero-pad (B, D, H, W, C) to multiples of ``window`` and split into windows, as the
    reference does (after norm1, so padded tokens are exact zeros)."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % window, (-h) % window, (-w) % window
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition3d(
    windows: torch.Tensor, window: int, padded: Grid, size: Grid
) -> torch.Tensor:
    """Inverse of :func:`window_partition3d`, cropping the padding away."""
    dp, hp, wp = padded
    b = windows.shape[0] // (dp * hp * wp // window**3)
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    d, h, w = size
    return x[:, :d, :h, :w, :].contiguous()
