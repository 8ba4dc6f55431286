"""Decomposed 3D relative positions: the official weights' rel-pos bias and its exact rewrites.

A leaf module (timm's ``layers/pos_embed_rel.py``): the attention layer (``attention``) and the
experimental sparse backends (``sparse``) both build on these functions, and neither is needed
here. ``dense_bias`` is the reference form (the public code's broadcast); ``padded_key_bias``
and ``rel_pos_terms_window`` give the closed form of zero-padded windows, ``fold_rel_pos`` the
mask-free rewrite that fused SDPA kernels run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the (q_size, k_size, C) relative-position embeddings from a (2L-1, C) table.

    Interpolates the table linearly when its length differs from what the sizes need (never
    the case for the released weights; kept for checkpoints trained at other sizes).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    if torch.compiler.is_compiling():  # traced: Inductor folds the index into constants
        return rel_pos[_rel_index(q_size, k_size, rel_pos.device)]
    return rel_pos[_cached_rel_index(q_size, k_size, rel_pos.device)]


def _rel_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel.long()


@functools.lru_cache(maxsize=64)
def _cached_rel_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """:func:`_rel_index` made once per shape and device (a constant: not five small kernels per
    attention call). Always a normal tensor, even when first asked for under inference mode, so
    training can index with it later."""
    with torch.inference_mode(False):
        return _rel_index(q_size, k_size, device)


def rel_pos_terms(
    q: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis rel-pos logits from the UNSCALED query (the official weights' convention).

    q: (B, heads, N, C) with N = prod(q_grid). Returns (B, heads, qd, qh, qw, k_axis) per axis;
    each axis table is indexed by that axis' query coordinate (combine with :func:`dense_bias`).
    """
    b, h, _, c = q.shape
    rq = q.reshape(b, h, *q_grid, c)
    rd = get_rel_pos(q_grid[0], k_grid[0], tables[0]).to(q.dtype)
    rh = get_rel_pos(q_grid[1], k_grid[1], tables[1]).to(q.dtype)
    rw = get_rel_pos(q_grid[2], k_grid[2], tables[2]).to(q.dtype)
    t_d = torch.einsum("bndhwc,dkc->bndhwk", rq, rd)
    t_h = torch.einsum("bndhwc,hkc->bndhwk", rq, rh)
    t_w = torch.einsum("bndhwc,wkc->bndhwk", rq, rw)
    return t_d, t_h, t_w


def dense_bias(terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Combine per-axis terms into the (B, heads, Nq, Nk) additive bias, the reference's way.

    The public code adds ``rel_d[:, :, :, :, None, None]`` (one colon short of the 2D SAM
    pattern), so on a cubic grid the bias of query (qd,qh,qw) for key (kd,kh,kw) is
    ``t_d[qd,qh,qw,kw] + t_h[qd,qh,kd,kw] + t_w[qd,qh,kh,kw]``: every axis term is taken at the
    key's w index, and the h/w terms use the query of token (qd,qh,kd) / (qd,qh,kh). The released
    weights were trained with this, so it is reproduced exactly (parity fixture: 2e-6).
    Here ``t_h``/``t_w`` are (B, heads, qd, qh, X, K): query row X along the w axis.
    """
    t_d, t_h, t_w = terms
    b, h, qd, qh, qw, kw = t_d.shape
    kd, kh = t_h.shape[-2], t_w.shape[-2]
    bias = (
        t_d[:, :, :, :, :, None, None, :]
        + t_h[:, :, :, :, None, :, None, :]
        + t_w[:, :, :, :, None, None, :, :]
    )
    return bias.reshape(b, h, qd * qh * qw, kd * kh * kw)


def padded_key_bias(
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor], real: Grid
) -> torch.Tensor:
    """log(sum over the padded keys of exp(rel-pos bias)), per real query: (B, heads, N).

    ``terms`` are over the whole padded window (see :func:`rel_pos_terms_window`). The bias
    factorises per key-w index:
    sum_k exp(bias) = sum_kw e^{t_d} (sum_kd e^{t_h}) (sum_kh e^{t_w}),
    over the full window minus the same over the real keys.
    """
    t_d, t_h, t_w = (t.float() for t in terms)
    gd, gh, gw = real
    # (B, h, qd, qh, kw): the h/w factors do not depend on the query's w index.
    log_all = torch.logsumexp(
        t_d + (torch.logsumexp(t_h, dim=4) + torch.logsumexp(t_w, dim=4))[:, :, :, :, None, :],
        dim=-1,
    )
    log_real = torch.logsumexp(
        t_d[..., :gw]
        + (torch.logsumexp(t_h[..., :gd, :gw], dim=4) + torch.logsumexp(t_w[..., :gh, :gw], dim=4))[
            :, :, :, :, None, :
        ],
        dim=-1,
    )
    out = log_all + torch.log1p(-torch.exp(log_real - log_all).clamp(max=1.0 - 1e-7))
    return out.flatten(2)


@functools.lru_cache(maxsize=16)
def _fold_keys(g: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One-hot key features of :func:`fold_rel_pos`: (N, 2 g^2) = [onehot(kd,kw), onehot(kh,kw)]."""
    with torch.inference_mode(False):
        idx = torch.arange(g**3, device=device)
        kd, kh, kw = idx // (g * g), (idx // g) % g, idx % g
        eye = torch.eye(g * g, device=device, dtype=dtype)
        return torch.cat([eye[kd * g + kw], eye[kh * g + kw]], dim=1)


def fold_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Exact attention with the official rel-pos bias and no additive mask (cubic grids).

    Under the reference's broadcast (:func:`dense_bias`) the bias of a query for key
    (kd, kh, kw) is ``A[kd, kw] + C[kh, kw]`` with ``A = t_d[.., kw] + t_h[.., kd, kw]`` and
    ``C = t_w[.., kh, kw]``: a dot product of the query's 2 g^2 values [A, C] with the key's
    one-hots [onehot(kd,kw), onehot(kh,kw)]. Appending those to q and k (and zeros to v) turns
    the biased attention into a plain one that flash/cuDNN kernels run; 128 + 2*64 = 256 head
    dims for FastSAM3D, within their limit.
    """
    t_d, t_h, t_w = terms
    b, h, g = q.shape[0], q.shape[1], t_d.shape[2]
    n, hd = q.shape[2], q.shape[3]
    a = (t_d[:, :, :, :, :, None, :] + t_h[:, :, :, :, None, :, :]).reshape(b, h, n, g * g)
    c = t_w[:, :, :, :, None, :, :].expand(b, h, g, g, g, g, g).reshape(b, h, n, g * g)
    q2 = torch.cat([q * scale, a.to(q.dtype), c.to(q.dtype)], dim=-1)
    keys = _fold_keys(g, q.device, q.dtype).expand(b, h, n, 2 * g * g)
    k2 = torch.cat([k, keys], dim=-1)
    v2 = torch.cat([v, v.new_zeros(b, h, n, 2 * g * g)], dim=-1)
    return F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., :hd]


def rel_pos_terms_window(
    q: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    real: Grid,
    full: Grid,
    b_q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rel-pos terms of the real queries of a zero-padded ``full`` window.

    Returns t_d (B, h, rd, rh, rw, Fw) and t_h, t_w (B, h, rd, rh, Fw, Fw): the h/w terms use
    the query row along w, whose padded entries are the q bias ``b_q`` (heads, hd) because the
    padded tokens are zeros (see :func:`dense_bias`). Needs a cubic window.
    """
    b, h, _, c = q.shape
    gd, gh, gw = real
    f = full[2]
    qg = q.reshape(b, h, gd, gh, gw, c)
    pad = b_q[None, :, None, None, None, :].expand(b, h, gd, gh, f - gw, c).to(q.dtype)
    q_row = torch.cat([qg, pad], dim=4)
    rd, rh, rw = (get_rel_pos(n, n, t).to(q.dtype) for t, n in zip(tables, full))
    t_d = torch.einsum("bndhwc,dkc->bndhwk", qg, rd[:gd])
    t_h = torch.einsum("bndhxc,hkc->bndhxk", q_row, rh[:gh])
    t_w = torch.einsum("bndhxc,xkc->bndhxk", q_row, rw)
    return t_d, t_h, t_w
