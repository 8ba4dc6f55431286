"""FlexAttention paths: the dense ``"flex"`` backend and the ``"flex"`` / ``"flex_union"``
sparse implementations (tokens reordered so each branch's BlockMask really skips blocks)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..rel_pos import Grid
from .common import Terms, check_terms, merge_lse, needs_grad, reference_attention, terms_list
from .pattern import SparsePattern, token_coords


def _score_mod(terms: Terms | None, coords: tuple[torch.Tensor, ...]) -> Callable | None:
    """score_mod adding the official rel-pos bias; ``coords`` map (possibly reordered) token
    positions to grid coordinates."""
    if terms is None:
        return None
    t_d, t_h, t_w = terms
    cd, ch, cw = coords

    def score_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (traced by flex)
        qd, qh, qw = cd[q_idx], ch[q_idx], cw[q_idx]
        kd, kh, kw = cd[kv_idx], ch[kv_idx], cw[kv_idx]
        bias = t_d[b, h, qd, qh, qw, kw] + t_h[b, h, qd, qh, kd, kw] + t_w[b, h, qd, qh, kh, kw]
        return score + bias.to(score.dtype)

    return score_mod


FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex() -> Callable:
    """One compiled flex_attention for every call. Each (grid, branch, score_mod) combination
    is its own specialisation; dynamo's default limit (8 per code object) would silently send
    the rest to the unfused eager kernel, so the limit is raised (never lowered) once here."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    if dynamo_config.recompile_limit < FLEX_RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = FLEX_RECOMPILE_LIMIT
    return torch.compile(flex_attention, dynamic=False)


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None,
    block_mask: object,
    scale: float,
    lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlexAttention, compiled on CUDA (once, cached); eager on CPU, where compiling costs
    tens of seconds per shape and the eager form is an exact (unfused) implementation."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    aux = AuxRequest(lse=True) if lse else None
    if q.device.type == "cuda":
        opts = None
        tile = getattr(block_mask, "BLOCK_SIZE", (128, 128))
        if tile[0] < 128:
            # Hopper's default bf16 forward tile is 128 query rows, which must divide the
            # BlockMask tile; smaller BlockMask tiles need a matching kernel tile.
            opts = {"fwd_BLOCK_M": tile[0], "fwd_BLOCK_N": min(tile[1], 64)}
        res = _compiled_flex()(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            return_aux=aux,
            kernel_options=opts,
        )
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without")
            res = flex_attention(
                q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_aux=aux
            )
    if lse:
        out, a = res
        return out, a.lse * _lse_to_natural(q.device.type == "cuda", q.device)
    return res, None


@functools.cache
def _lse_to_natural(compiled: bool, device: torch.device) -> float:
    """Factor turning the LSE that FlexAttention returns into a natural log.

    Merging branches needs natural-log LSEs, but whether the compiled kernel's base-2
    statistics are converted before they are returned has changed between torch releases.
    So ask once: with all scores 0 over n keys the LSE is ln(n) exactly.
    """
    if not compiled:
        return 1.0
    from torch.nn.attention.flex_attention import AuxRequest

    n = 128
    z = torch.zeros(1, 1, n, 16, device=device)
    _, aux = _compiled_flex()(z, z, z, scale=1.0, return_aux=AuxRequest(lse=True))
    ratio = float(aux.lse.float().mean()) / math.log(n)
    for factor in (1.0, math.log(2.0), 1.0 / math.log(2.0)):
        if abs(ratio * factor - 1.0) < 1e-3:
            return factor
    raise RuntimeError(
        f"FlexAttention returned an LSE {ratio:.4f}x ln(n) for uniform scores; "
        "cannot merge sparse branches on this torch version"
    )


def flex_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: Terms | None,
    scale: float,
    grid: Grid,
) -> torch.Tensor:
    """Exact dense attention via FlexAttention with the rel-pos bias in a ``score_mod``.

    q, k, v: (B, heads, N, hd) in raster order of ``grid``. On CPU with gradients required
    (FlexAttention has no CPU backward) this computes the same function with SDPA + dense bias.
    """
    check_terms(terms, grid)
    if q.device.type == "cpu" and needs_grad(q, k, v, *terms_list(terms)):
        return reference_attention(q, k, v, terms, scale, None)
    mod = _score_mod(terms, token_coords(grid, q.device))
    return _flex(q, k, v, mod, None, scale)[0]


@dataclass(frozen=True)
class _FlexBranch:
    perm: torch.Tensor  # position in branch order -> raster token
    inv: torch.Tensor  # raster token -> position
    coords: tuple[torch.Tensor, ...]  # grid coordinates per branch-order position
    block_mask: object


def _block_mask(mask_mod: Callable, n: int, device: torch.device, block: int) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=block)


def _order(gid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = gid.numel()
    perm = torch.argsort(gid * n + torch.arange(n, device=gid.device))
    return perm, torch.argsort(perm)


@torch.compiler.disable  # built once per shape, outside any compiled graph
@functools.lru_cache(maxsize=32)
def _flex_plan(branches: tuple, block: int, grid: Grid, device: torch.device) -> list[_FlexBranch]:
    """Per branch: its group-contiguous order and a BlockMask of the keys it adds to the
    earlier branches (so the branches are disjoint). Branches adding nothing are dropped."""
    pattern = SparsePattern(branches)
    gid = pattern.group_ids(grid, device)
    coords = token_coords(grid, device)
    n = gid.shape[1]
    plan = []
    for i in range(len(branches)):
        perm, inv = _order(gid[i])
        gp = gid[:, perm]  # group ids of all branches, in this branch's order

        mask_mod = _branch_mask_mod(gp[i].contiguous(), tuple(gp[j].contiguous() for j in range(i)))
        bm = _block_mask(mask_mod, n, device, block)
        if int(bm.kv_num_blocks.sum()) + int(_full_blocks(bm)) == 0:
            continue
        plan.append(_FlexBranch(perm, inv, tuple(c[perm] for c in coords), bm))
    return plan


def _branch_mask_mod(own: torch.Tensor, earlier: tuple[torch.Tensor, ...]) -> Callable:
    """mask_mod of one branch: same group in this branch (``own``: group id per token), in no
    earlier branch's group (``earlier``).

    Built by a factory so that the tensors are closure cells, which torch.compile lifts as
    inputs. Function default arguments are not guarded: a ``def mask_mod(..., gp=gp, i=i)``
    compiled for branch 0 was silently reused with branch 0's mask for every later branch on
    CUDA. (No int in the closure either: dynamo would make it a data-dependent symbol.)
    """

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (traced by flex)
        keep = own[q_idx] == own[kv_idx]
        for g in earlier:
            keep = keep & (g[q_idx] != g[kv_idx])
        return keep

    return mask_mod


def _full_blocks(bm: object) -> int:
    full = getattr(bm, "full_kv_num_blocks", None)
    return 0 if full is None else int(full.sum())


def sparse_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: Terms | None,
    scale: float,
    grid: Grid,
    pattern: SparsePattern,
) -> torch.Tensor:
    outs, lses = [], []
    for br in _flex_plan(pattern.branches, pattern.flex_block, grid, q.device):
        qp, kp, vp = (x.index_select(2, br.perm) for x in (q, k, v))
        o, lse = _flex(qp, kp, vp, _score_mod(terms, br.coords), br.block_mask, scale, lse=True)
        outs.append(o.index_select(2, br.inv))
        lses.append(lse.index_select(2, br.inv))
    if len(outs) == 1:
        return outs[0]
    return merge_lse(outs, lses)


@torch.compiler.disable  # built once per shape, outside any compiled graph
@functools.lru_cache(maxsize=32)
def _flex_union_plan(branches: tuple, block: int, grid: Grid, device: torch.device) -> _FlexBranch:
    gid = SparsePattern(branches).group_ids(grid, device)
    perm, inv = _order(gid[0])
    gp = gid[:, perm]

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        keep = gp[0, q_idx] == gp[0, kv_idx]
        for j in range(1, gp.shape[0]):
            keep = keep | (gp[j, q_idx] == gp[j, kv_idx])
        return keep

    coords = tuple(c[perm] for c in token_coords(grid, device))
    return _FlexBranch(perm, inv, coords, _block_mask(mask_mod, gid.shape[1], device, block))


def sparse_flex_union(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: Terms | None,
    scale: float,
    grid: Grid,
    pattern: SparsePattern,
) -> torch.Tensor:
    br = _flex_union_plan(pattern.branches, pattern.flex_block, grid, q.device)
    qp, kp, vp = (x.index_select(2, br.perm) for x in (q, k, v))
    o, _ = _flex(qp, kp, vp, _score_mod(terms, br.coords), br.block_mask, scale)
    return o.index_select(2, br.inv)
