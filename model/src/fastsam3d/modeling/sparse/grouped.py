"""The grouped (``"flash"``) sparse implementation: a dense kernel over gathered groups, the
rel-pos bias folded into head dims, branches combined by inclusion-exclusion."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..rel_pos import Grid
from .common import Terms, merge_lse
from .pattern import AxisRule, SparsePattern, Structure

# kernel(q, k, v, scale) with (batch, seq, heads, dim) inputs -> (out same layout, lse (batch,
# heads, seq) in natural log): flash_attn_func's contract, also met by reference_group_kernel.
GroupKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]
FLASH_MAX_HEAD_DIM = 256


def _intersect(a: Structure, b: Structure) -> Structure:
    out = []
    for (ba, ra), (bb, rb) in zip(a, b):
        blk = min(ba, bb)
        out.append((blk, min(math.lcm(ra, rb), blk)))
    return tuple(out)


def inclusion_exclusion(pattern: SparsePattern, grid: Grid) -> list[tuple[int, Structure]]:
    """The union's indicator as sum c_S 1[same group of S] over branch intersections S
    (coefficients of identical intersections summed, zeros dropped)."""
    rules = pattern.rules(grid)
    coef: dict[Structure, int] = {}
    for size in range(1, len(rules) + 1):
        for subset in itertools.combinations(rules, size):
            s = functools.reduce(_intersect, subset)
            coef[s] = coef.get(s, 0) + (-1) ** (size + 1)
    return [(c, s) for s, c in coef.items() if c != 0]


def flash_unsupported_reason(pattern: SparsePattern, grid: Grid, head_dim: int) -> str | None:
    """Why the grouped (flash) path cannot run ``pattern`` on ``grid``, or None if it can.

    It needs equal-sized groups: clipped blocks dividing the grid and each other per axis,
    dilations (and their lcms) dividing the blocks; and the folded head dim <= 256.
    """
    rules = pattern.rules(grid)
    for axis, size in enumerate(grid):
        blocks = sorted({r[axis][0] for r in rules})
        for i, b in enumerate(blocks):
            if size % b:
                return f"block {b} does not divide grid axis {axis} of size {size}"
            if any(b2 % b for b2 in blocks[i + 1 :]):
                return f"blocks {blocks} on axis {axis} do not nest (each must divide the next)"
    extra = 0
    for _, s in inclusion_exclusion(pattern, grid):
        for blk, dil in s:
            if blk % dil:
                return f"dilation {dil} does not divide block {blk}"
        nd, nh, nw = (blk // dil for blk, dil in s)
        extra = max(extra, nw + nd * nw + nh * nw)
    folded = _round8(head_dim + extra)
    if folded > FLASH_MAX_HEAD_DIM:
        return f"head dim {head_dim} + {extra} rel-pos dims = {folded} > {FLASH_MAX_HEAD_DIM}"
    return None


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _axis_sets(rule: AxisRule, size: int, device: torch.device) -> torch.Tensor:
    """(groups along the axis, members): coordinates of each axis group, ascending."""
    b, r = rule
    starts = torch.arange(0, size, b, device=device)[:, None] + torch.arange(r, device=device)
    return starts.flatten()[:, None] + torch.arange(0, b, r, device=device)


def _group_layout(s: Structure, grid: Grid, device: torch.device) -> tuple[torch.Tensor, ...]:
    """idx (G, L) raster tokens of every group (raster order inside), and per group the
    member coordinates along d, h, w: (G, nd), (G, nh), (G, nw)."""
    sd, sh, sw = (_axis_sets(rl, n, device) for rl, n in zip(s, grid))
    _, h, w = grid
    gd, gh, gw = sd.shape[0], sh.shape[0], sw.shape[0]
    idx = (
        sd[:, None, None, :, None, None] * (h * w)
        + sh[None, :, None, None, :, None] * w
        + sw[None, None, :, None, None, :]
    )
    g = gd * gh * gw
    ex = (gd, gh, gw, -1)
    return (
        idx.reshape(g, -1),
        sd[:, None, None, :].expand(ex).reshape(g, -1),
        sh[None, :, None, :].expand(ex).reshape(g, -1),
        sw[None, None, :, :].expand(ex).reshape(g, -1),
    )


def _fold_bias(
    terms: Terms,
    idx: torch.Tensor,
    sd: torch.Tensor,
    sh: torch.Tensor,
    sw: torch.Tensor,
    grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rel-pos bias inside each group as a dot product: query side (B, heads, G, L, E)
    holding the bias at every key coordinate of the group, key side one-hot (L, E).

    Key j of a group has local coords (jd, jh, jw); its bias for a query is
    A_d[jw] + A_h[jd, jw] + A_w[jh, jw] (see ``dense_bias``), so E = nw + nd*nw + nh*nw.
    """
    t_d, t_h, t_w = terms
    _, h, w = grid
    nd, nh, nw = sd.shape[1], sh.shape[1], sw.shape[1]
    qtok = idx[:, :, None]  # (G, L, 1)
    qd, qh, qw = qtok // (h * w), (qtok // w) % h, qtok % w
    qd4, qh4 = qd[..., None], qh[..., None]  # (G, L, 1, 1)
    a_d = t_d[:, :, qd, qh, qw, sw[:, None, :]]  # (B, heads, G, L, nw)
    a_h = t_h[:, :, qd4, qh4, sd[:, None, :, None], sw[:, None, None, :]]  # (.., nd, nw)
    a_w = t_w[:, :, qd4, qh4, sh[:, None, :, None], sw[:, None, None, :]]  # (.., nh, nw)
    qside = torch.cat([a_d, a_h.flatten(-2), a_w.flatten(-2)], dim=-1)
    j = torch.arange(nd * nh * nw, device=idx.device)
    jd, jh, jw = j // (nh * nw), (j // nw) % nh, j % nw
    kside = torch.cat(
        [
            F.one_hot(jw, nw),
            F.one_hot(jd * nw + jw, nd * nw),
            F.one_hot(jh * nw + jw, nh * nw),
        ],
        dim=-1,
    )
    return qside, kside


def sparse_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: Terms | None,
    scale: float,
    grid: Grid,
    pattern: SparsePattern,
    kernel: GroupKernel,
) -> torch.Tensor:
    """The flash path: dense ``kernel`` over gathered groups of every branch intersection,
    rel-pos folded into head dims, results combined by inclusion-exclusion of their softmax
    sums. ``kernel`` is flash-attn's (:func:`flash_group_kernel`) or any kernel with its
    contract (:func:`reference_group_kernel`, used to test this math without flash-attn)."""
    reason = flash_unsupported_reason(pattern, grid, q.shape[-1])
    if reason is not None:
        raise ValueError(f"pattern {pattern.branches} cannot run grouped on {grid}: {reason}")
    b, nh, n, hd = q.shape
    outs, lses, coefs = [], [], []
    for coef, s in inclusion_exclusion(pattern, grid):
        idx, sd, sh, sw = _group_layout(s, grid, q.device)
        g, L = idx.shape
        qg, kg, vg = (x[:, :, idx] for x in (q, k, v))  # (B, heads, G, L, hd)
        if terms is not None:
            qside, kside = _fold_bias(terms, idx, sd, sh, sw, grid)
            qg = torch.cat([qg, (qside / scale).to(q.dtype)], dim=-1)
            kg = torch.cat([kg, kside.to(k.dtype).expand(b, nh, g, L, -1)], dim=-1)
        dim = _round8(qg.shape[-1])
        qg, kg, vg = (F.pad(x, (0, dim - x.shape[-1])) for x in (qg, kg, vg))
        qg, kg, vg = (x.permute(0, 2, 3, 1, 4).reshape(b * g, L, nh, dim) for x in (qg, kg, vg))
        o, lse = kernel(qg, kg, vg, scale)
        o = o[..., :hd].reshape(b, g, L, nh, hd).permute(0, 3, 1, 2, 4).reshape(b, nh, n, hd)
        lse = lse.reshape(b, g, nh, L).permute(0, 2, 1, 3).reshape(b, nh, n)
        inv = torch.argsort(idx.flatten())
        outs.append(o.index_select(2, inv))
        lses.append(lse.index_select(2, inv))
        coefs.append(float(coef))
    return merge_lse(outs, lses, coefs)


def reference_group_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch stand-in with flash_attn_func's contract: SDPA output + its log-sum-exp."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (batch, heads, seq, dim)
    out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    lse = torch.logsumexp((qt.float() @ kt.float().transpose(-2, -1)) * scale, dim=-1)
    return out.transpose(1, 2), lse


def flash_group_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn 2's ``flash_attn_func`` (bf16 unless given fp16), returning its LSE."""
    from flash_attn import flash_attn_func

    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out, lse, _ = flash_attn_func(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=False,
        return_attn_probs=True,
    )
    return out.to(q.dtype), lse.float()
