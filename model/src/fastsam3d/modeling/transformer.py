"""The mask decoder's two-way transformer (tokens <-> image embedding).

Its LayerNorms are ``nn.LayerNorm`` with the default eps 1e-5 (the encoder uses 1e-6); the MLP
uses ReLU. Both match the released weights.

Its cross attentions pair a handful of tokens (5 + points + 1) with the 512 image tokens, so
their cost is the projections of the 512 image tokens (4 of 5 GEMMs, ~80 % of the
transformer's 0.8 GFLOP). :class:`Attention` folds those projections onto the token side
instead (the same sums, reassociated; see :meth:`Attention.forward`): the click's transformer
then does ~0.25 GFLOP, with results equal to the plain form within fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock, click_rewrites


class Attention(nn.Module):
    """Attention with optional down-projection of the embedding size (q/k/v/out_proj keys).

    ``fold`` (default on) lets :meth:`forward` fold the projections of the long side onto the
    short one when that does less work; the ONNX export turns it off (its graphs keep the plain
    form, with a dynamic number of points).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.fold = True

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, Nq, C) queries, (B, Nk, C) keys and values -> (B, Nq, C).

        With n tokens on the short side and h heads of width d, the plain form costs
        ~4 * N * C * h * d on the long side's N tokens and the folded forms ~4 * N * C * h * n,
        so a side with n <= d / 2 tokens is folded (the click: n = 7, d = 24).
        """
        if self.fold and click_rewrites(q):
            short = self.internal_dim // self.num_heads // 2
            if q.shape[1] <= short < k.shape[1]:
                return self._few_queries(q, k, v)
            if k.shape[1] <= short < q.shape[1]:
                return self._few_keys(q, k, v)
        return self._plain(q, k, v)

    def _heads(self, linear: nn.Linear) -> torch.Tensor:
        """The weight of a projection to the internal width as (heads, d, C)."""
        return linear.weight.reshape(self.num_heads, -1, linear.weight.shape[1])

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries, many keys: the key and value projections move to the query side.

        Per head, (q_h Wk_h) . k_j replaces q_h . (Wk_h k_j + bk_h): the dropped q_h . bk_h is
        the same for every key, and softmax ignores it. The values are averaged first and
        projected after (the weights sum to 1, so the bias passes through). The heads share
        keys and values, so one single-head attention over h * n queries of width C does it.
        """
        b, n, _ = q.shape
        h = self.num_heads
        qh = self._split(self.q_proj(q))  # (B, h, n, d)
        qk = (qh @ self._heads(self.k_proj)).reshape(b, 1, h * n, -1)  # (B, 1, h n, C)
        scale = qh.shape[-1] ** -0.5
        avg = F.scaled_dot_product_attention(qk, k[:, None], v[:, None], scale=scale)
        wv = self._heads(self.v_proj).transpose(1, 2)  # (h, C, d)
        out = avg.reshape(b, h, n, -1) @ wv + self.v_proj.bias.reshape(h, 1, -1)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    def _few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Many queries, few keys: the query and output projections move to the key side.

        Per head, q . (Wq_h^T k_h) + bq_h . k_h replaces (Wq_h q + bq_h) . k_h, and the values
        go through the output projection before the average: two GEMMs of the N queries with
        the h * n folded keys and values instead of two N x C x (h d) projections.
        """
        b, n, _ = k.shape
        h = self.num_heads
        kh = self._split(self.k_proj(k))  # (B, h, n, d)
        scale = kh.shape[-1] ** -0.5
        keys = (self._heads(self.q_proj).transpose(1, 2) @ kh.transpose(2, 3)) * scale
        keys = keys.permute(0, 2, 1, 3).reshape(b, -1, h * n)  # (B, C, h n)
        bias = (kh @ self.q_proj.bias.reshape(h, -1, 1)).reshape(b, 1, h * n) * scale
        logits = torch.baddbmm(bias, q, keys).unflatten(-1, (h, n)).float()
        # softmax over n (~7) contiguous values: ATen's kernel is ~6x slower than this for so
        # short rows; the same max-shifted exponentials and normalising sum
        attn = (logits - logits.amax(-1, keepdim=True)).exp_()
        attn = attn.div_(attn.sum(-1, keepdim=True)).flatten(2)  # (B, Nq, h n)
        vh = self._split(self.v_proj(v))  # (B, h, n, d)
        wo = self.out_proj.weight.reshape(-1, h, vh.shape[-1]).permute(1, 2, 0)  # (h, d, C)
        vals = (vh @ wo).reshape(b, h * n, -1)  # (B, h n, C)
        return torch.baddbmm(self.out_proj.bias.expand(b, 1, -1), attn.to(vals.dtype), vals)

    def _plain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._split(self.q_proj(q))
        k = self._split(self.k_proj(k))
        v = self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock3D(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # no PE, no residual
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 384,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        if self.final_attn_token_to_image.fold and click_rewrites(image_embedding):
            # dense (B, XYZ, C) rows: every later add, norm and GEMM on the image tokens is
            # then a plain row-major one (strided adds cost ~3x here). Off in the ONNX export,
            # whose packaged graphs keep the plain form.
            keys, key_pe = keys.contiguous(), key_pe.contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
