"""What every sparse implementation shares: input checks, the dense reference computation and
the log-sum-exp merge of partial softmax results."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rel_pos import Grid, dense_bias

Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def terms_list(terms: Terms | None) -> list[torch.Tensor]:
    return [] if terms is None else list(terms)


def check_terms(terms: Terms | None, grid: Grid) -> None:
    if terms is None:
        return
    d, h, w = grid
    if terms[0].shape[-4:-1] != (d, h, w) or not (d == h == w):
        raise ValueError(
            f"rel-pos terms {tuple(terms[0].shape)} do not fit grid {grid}: the official "
            "rel-pos form indexes every axis term by the key's w index, so it needs a cubic grid"
        )


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: Terms | None,
    scale: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Dense logits + rel-pos bias (+ mask) through SDPA: differentiable on every device."""
    bias = None
    if terms is not None:
        bias = dense_bias(terms).to(q.dtype)
    if mask is not None:
        neg = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        neg.masked_fill_(~mask, float("-inf"))
        bias = neg if bias is None else bias + neg
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def merge_lse(
    outs: list[torch.Tensor], lses: list[torch.Tensor], coefs: list[float] | None = None
) -> torch.Tensor:
    """Combine partial softmax results: out = sum c_i e^{lse_i} out_i / sum c_i e^{lse_i}."""
    lse = torch.stack([x.float() for x in lses])  # (branches, B, heads, N)
    m = lse.max(0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)
    if coefs is not None:
        w = w * torch.tensor(coefs, dtype=w.dtype, device=w.device)[:, None, None, None]
    num = sum(wi[..., None] * o.float() for wi, o in zip(w, outs))
    return (num / w.sum(0)[..., None]).to(outs[0].dtype)
