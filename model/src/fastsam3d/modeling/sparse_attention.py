"""FlexAttention dense backend and the 3D block-sparse ("3D sparse flash") attention option.

Both compute attention with FastSAM3D's rel-pos bias exactly as the official weights saw it
(:func:`fastsam3d.modeling.rel_pos.dense_bias`): query (qd,qh,qw), key (kd,kh,kw) get
``t_d[qd,qh,qw,kw] + t_h[qd,qh,kd,kw] + t_w[qd,qh,kh,kw]``.

The sparse pattern (:class:`SparsePattern`) is a union of *branches* ``(block, dilation)``,
LongNet's (segment, dilation) pairs carried to a 3D grid: along every axis the grid is cut into
blocks of ``block`` tokens (``0`` = the whole axis), and inside a block a token sees the tokens
whose offset from the block start agrees with its own modulo ``dilation``. So ``(4, 1)`` is
dense attention inside each 4^3 cube, ``(0, 2)`` is the stride-2 sub-grid over the whole volume.
Every branch contains the token itself. Softmax runs over the union of the branches.

Implementations (``SparsePattern.impl``), all the same function:

* ``"einsum"``: dense logits + the union mask. The reference; O(N^2) memory.
* ``"flex"``: one FlexAttention call per branch, with the tokens reordered so that the branch's
  groups are contiguous (its BlockMask is block-diagonal and really skips blocks), keys already
  covered by an earlier branch masked out (branches become disjoint), outputs merged with their
  log-sum-exp.
* ``"flex_union"``: one FlexAttention call with the union ``mask_mod``, tokens in the first
  branch's block-major order. Simpler, but a global dilated branch touches every key block, so
  the BlockMask can skip little; kept for measuring that.
* ``"flash"``: flash-attn's dense kernel on gathered groups (every group of a branch is a
  Cartesian product of per-axis coordinate sets, so gathering gives equal-length sequences). The
  rel-pos bias is folded into extra head dims and overlapping branches are combined by
  inclusion-exclusion over their intersections (which are again groups) in log-sum-exp space.
* ``"auto"``: flash on CUDA when importable and the pattern allows it, else flex on CUDA,
  else einsum (CPU).

FlexAttention has no backward on CPU: whenever autograd needs gradients on CPU, the flex paths
fall back to the einsum/SDPA computation of the same function (documented, not an error).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rel_pos import Grid, dense_bias

Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# kernel(q, k, v, scale) with (batch, seq, heads, dim) inputs -> (out same layout, lse (batch,
# heads, seq) in natural log): flash_attn_func's contract, also met by reference_group_kernel.
GroupKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float],
                       tuple[torch.Tensor, torch.Tensor]]
# Per axis (block, dilation) after clipping to the grid.
AxisRule = tuple[int, int]
Structure = tuple[AxisRule, AxisRule, AxisRule]

IMPLS = ("auto", "einsum", "flex", "flex_union", "flash")
FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- the pattern


@dataclass(frozen=True)
class SparsePattern:
    """A 3D block-sparse attention pattern: the union of ``(block, dilation)`` branches.

    The default is the paper figure's (segment, dilation) pairs (4,1), (8,2), (16,4), read per
    axis: dense 4^3 cubes, the stride-2 sub-grid of each 8^3 cube, the stride-4 sub-grid of
    each 16^3 cube (blocks larger than the grid are clipped to it). On the 8^3 token grid of a
    128^3 crop that is 120 of 512 keys per query (23%); on 16^3, 176 of 4096 (4.3%).
    """

    branches: tuple[tuple[int, int], ...] = ((4, 1), (8, 2), (16, 4))
    impl: str = "auto"
    # FlexAttention BlockMask tile (tokens). 128 is flex's default; 64 matches 4^3 groups.
    flex_block: int = 128

    def __post_init__(self) -> None:
        branches = tuple(tuple(int(x) for x in br) for br in self.branches)
        object.__setattr__(self, "branches", branches)
        if not branches:
            raise ValueError("SparsePattern needs at least one (block, dilation) branch")
        for br in branches:
            if len(br) != 2 or br[0] < 0 or br[1] < 1:
                raise ValueError(
                    f"SparsePattern branch {br} must be (block >= 0, dilation >= 1); "
                    "block 0 means the whole axis"
                )
        if len(branches) > 8:
            raise ValueError(f"SparsePattern has {len(branches)} branches; at most 8 supported")
        if self.flex_block < 16 or self.flex_block & (self.flex_block - 1):
            raise ValueError(f"flex_block must be a power of two >= 16, got {self.flex_block}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown sparse impl {self.impl!r}; use one of {IMPLS}")

    def rules(self, grid: Grid) -> list[Structure]:
        """Per branch, the per-axis (block, dilation) clipped to ``grid``."""
        return [tuple(_clip_rule(b, r, g) for g in grid) for b, r in self.branches]

    def group_ids(self, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
        """(branches, N) int64: the group of every raster-order token in every branch."""
        return torch.stack([_group_id(rule, grid, device) for rule in self.rules(grid)])

    def mask(self, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N, N) bool, True where query (row) may attend key (column); raster token order."""
        gid = self.group_ids(grid, device)
        return (gid[:, :, None] == gid[:, None, :]).any(0)

    def keys_per_query(self, grid: Grid) -> torch.Tensor:
        """(N,) number of keys each query attends (row sums of :meth:`mask`, chunked)."""
        gid = self.group_ids(grid)
        n = gid.shape[1]
        counts = torch.empty(n, dtype=torch.int64)
        for s in range(0, n, 1024):
            rows = gid[:, s:s + 1024]
            counts[s:s + 1024] = (rows[:, :, None] == gid[:, None, :]).any(0).sum(-1)
        return counts

    def density(self, grid: Grid) -> float:
        """Fraction of the N^2 query-key pairs that are attended."""
        n = math.prod(grid)
        return float(self.keys_per_query(grid).sum()) / (n * n)

    def describe(self, grid: Grid | None = None) -> str:
        parts = []
        for b, r in self.branches:
            where = "the whole grid" if b == 0 else f"each {b}^3 block"
            parts.append(f"({b},{r}): " + (f"dense in {where}" if r == 1 else
                                          f"stride-{r} sub-grid of {where}"))
        text = "3D sparse attention, union of " + "; ".join(parts) + f" [impl={self.impl}]"
        if grid is not None:
            kpq = self.keys_per_query(grid).float().mean().item()
            text += (f"; on {grid[0]}x{grid[1]}x{grid[2]}: {kpq:.1f} of {math.prod(grid)} keys "
                     f"per query ({100 * self.density(grid):.2f}%)")
        return text

    def __str__(self) -> str:
        return self.describe()


def _clip_rule(block: int, dilation: int, size: int) -> AxisRule:
    b = size if block == 0 else min(block, size)
    return b, min(dilation, b)


def _axis_group(rule: AxisRule, size: int, device: torch.device | str) -> torch.Tensor:
    b, r = rule
    c = torch.arange(size, device=device)
    return (c // b) * r + (c % b) % r


def _group_id(rule: Structure, grid: Grid, device: torch.device | str) -> torch.Tensor:
    gd, gh, gw = (_axis_group(rl, s, device) for rl, s in zip(rule, grid))
    nh, nw = int(gh.max()) + 1, int(gw.max()) + 1
    return ((gd[:, None, None] * nh + gh[None, :, None]) * nw + gw[None, None, :]).flatten()


def _coords(grid: Grid, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    d, h, w = grid
    t = torch.arange(d * h * w, device=device)
    return t // (h * w), (t // w) % h, t % w


# ----------------------------------------------------------------------------- common helpers


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _terms_list(terms: Terms | None) -> list[torch.Tensor]:
    return [] if terms is None else list(terms)


def _check_terms(terms: Terms | None, grid: Grid) -> None:
    if terms is None:
        return
    d, h, w = grid
    if terms[0].shape[-4:-1] != (d, h, w) or not (d == h == w):
        raise ValueError(
            f"rel-pos terms {tuple(terms[0].shape)} do not fit grid {grid}: the official "
            "rel-pos form indexes every axis term by the key's w index, so it needs a cubic grid"
        )


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms | None, scale: float,
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable | None,
    block_mask: object, scale: float, lse: bool = False,
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
        res = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask,
                               scale=scale, return_aux=aux, kernel_options=opts)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without")
            res = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                 scale=scale, return_aux=aux)
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
    raise RuntimeError(f"FlexAttention returned an LSE {ratio:.4f}x ln(n) for uniform scores; "
                       "cannot merge sparse branches on this torch version")


# ----------------------------------------------------------------------------- dense flex


def flex_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms | None, scale: float,
    grid: Grid,
) -> torch.Tensor:
    """Exact dense attention via FlexAttention with the rel-pos bias in a ``score_mod``.

    q, k, v: (B, heads, N, hd) in raster order of ``grid``. On CPU with gradients required
    (FlexAttention has no CPU backward) this computes the same function with SDPA + dense bias.
    """
    _check_terms(terms, grid)
    if q.device.type == "cpu" and _needs_grad(q, k, v, *_terms_list(terms)):
        return _reference(q, k, v, terms, scale, None)
    mod = _score_mod(terms, _coords(grid, q.device))
    return _flex(q, k, v, mod, None, scale)[0]


# ----------------------------------------------------------------------------- sparse


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(pattern: SparsePattern, q: torch.Tensor, grid: Grid) -> str:
    """The implementation ``pattern`` runs with for this input (see module docstring)."""
    if pattern.impl != "auto":
        return pattern.impl
    if q.device.type == "cuda":
        if flash_available() and flash_unsupported_reason(pattern, grid, q.shape[-1]) is None:
            return "flash"
        return "flex"
    return "einsum"


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms | None, scale: float,
    grid: Grid, pattern: SparsePattern | None = None,
) -> torch.Tensor:
    """Attention over the union mask of ``pattern`` with the official rel-pos bias.

    q, k, v: (B, heads, N, hd) in raster order of ``grid``; returns (B, heads, N, hd).
    """
    pattern = SparsePattern() if pattern is None else pattern
    if not isinstance(pattern, SparsePattern):
        raise TypeError(f"sparse attention needs a SparsePattern, got {type(pattern).__name__}; "
                        "e.g. SparsePattern(((4, 1), (0, 2)))")
    _check_terms(terms, grid)
    if q.shape[2] != math.prod(grid):
        raise ValueError(f"{q.shape[2]} tokens do not fill grid {grid}")
    impl = resolve_impl(pattern, q, grid)
    cpu_grad = q.device.type == "cpu" and _needs_grad(q, k, v, *_terms_list(terms))
    if impl == "einsum" or (impl in ("flex", "flex_union") and cpu_grad):
        return _reference(q, k, v, terms, scale, _mask_cached(pattern.branches, grid, q.device))
    if impl == "flex":
        return _sparse_flex(q, k, v, terms, scale, grid, pattern)
    if impl == "flex_union":
        return _sparse_flex_union(q, k, v, terms, scale, grid, pattern)
    if impl == "flash":
        if not flash_available():
            raise ImportError("SparsePattern(impl='flash') needs the flash_attn package; "
                              "install it or use impl='flex' / 'auto'")
        return sparse_grouped(q, k, v, terms, scale, grid, pattern, flash_group_kernel)
    raise ValueError(f"unknown sparse impl {impl!r}")


@torch.compiler.disable  # built once per shape, outside any compiled graph
@functools.lru_cache(maxsize=32)
def _mask_cached(branches: tuple, grid: Grid, device: torch.device) -> torch.Tensor:
    return SparsePattern(branches).mask(grid, device)


@dataclass(frozen=True)
class _FlexBranch:
    perm: torch.Tensor       # position in branch order -> raster token
    inv: torch.Tensor        # raster token -> position
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
def _flex_plan(
    branches: tuple, block: int, grid: Grid, device: torch.device
) -> list[_FlexBranch]:
    """Per branch: its group-contiguous order and a BlockMask of the keys it adds to the
    earlier branches (so the branches are disjoint). Branches adding nothing are dropped."""
    pattern = SparsePattern(branches)
    gid = pattern.group_ids(grid, device)
    coords = _coords(grid, device)
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


def _merge_lse(outs: list[torch.Tensor], lses: list[torch.Tensor],
               coefs: list[float] | None = None) -> torch.Tensor:
    """Combine partial softmax results: out = sum c_i e^{lse_i} out_i / sum c_i e^{lse_i}."""
    lse = torch.stack([x.float() for x in lses])  # (branches, B, heads, N)
    m = lse.max(0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)
    if coefs is not None:
        w = w * torch.tensor(coefs, dtype=w.dtype, device=w.device)[:, None, None, None]
    num = sum(wi[..., None] * o.float() for wi, o in zip(w, outs))
    return (num / w.sum(0)[..., None]).to(outs[0].dtype)


def _sparse_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms | None, scale: float,
    grid: Grid, pattern: SparsePattern,
) -> torch.Tensor:
    outs, lses = [], []
    for br in _flex_plan(pattern.branches, pattern.flex_block, grid, q.device):
        qp, kp, vp = (x.index_select(2, br.perm) for x in (q, k, v))
        o, lse = _flex(qp, kp, vp, _score_mod(terms, br.coords), br.block_mask, scale, lse=True)
        outs.append(o.index_select(2, br.inv))
        lses.append(lse.index_select(2, br.inv))
    if len(outs) == 1:
        return outs[0]
    return _merge_lse(outs, lses)


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

    coords = tuple(c[perm] for c in _coords(grid, device))
    return _FlexBranch(perm, inv, coords, _block_mask(mask_mod, gid.shape[1], device, block))


def _sparse_flex_union(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms | None, scale: float,
    grid: Grid, pattern: SparsePattern,
) -> torch.Tensor:
    br = _flex_union_plan(pattern.branches, pattern.flex_block, grid, q.device)
    qp, kp, vp = (x.index_select(2, br.perm) for x in (q, k, v))
    o, _ = _flex(qp, kp, vp, _score_mod(terms, br.coords), br.block_mask, scale)
    return o.index_select(2, br.inv)


# ----------------------------------------------------------------------------- grouped (flash)


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
            if any(b2 % b for b2 in blocks[i + 1:]):
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
    idx = (sd[:, None, None, :, None, None] * (h * w) + sh[None, :, None, None, :, None] * w
           + sw[None, None, :, None, None, :])
    g = gd * gh * gw
    ex = (gd, gh, gw, -1)
    return (idx.reshape(g, -1), sd[:, None, None, :].expand(ex).reshape(g, -1),
            sh[None, :, None, :].expand(ex).reshape(g, -1),
            sw[None, None, :, :].expand(ex).reshape(g, -1))


def _fold_bias(
    terms: Terms, idx: torch.Tensor, sd: torch.Tensor, sh: torch.Tensor, sw: torch.Tensor,
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
    qtok = idx[:, :, None]                       # (G, L, 1)
    qd, qh, qw = qtok // (h * w), (qtok // w) % h, qtok % w
    qd4, qh4 = qd[..., None], qh[..., None]      # (G, L, 1, 1)
    a_d = t_d[:, :, qd, qh, qw, sw[:, None, :]]  # (B, heads, G, L, nw)
    a_h = t_h[:, :, qd4, qh4, sd[:, None, :, None], sw[:, None, None, :]]  # (.., nd, nw)
    a_w = t_w[:, :, qd4, qh4, sh[:, None, :, None], sw[:, None, None, :]]  # (.., nh, nw)
    qside = torch.cat([a_d, a_h.flatten(-2), a_w.flatten(-2)], dim=-1)
    j = torch.arange(nd * nh * nw, device=idx.device)
    jd, jh, jw = j // (nh * nw), (j // nw) % nh, j % nw
    kside = torch.cat([
        F.one_hot(jw, nw), F.one_hot(jd * nw + jw, nd * nw), F.one_hot(jh * nw + jw, nh * nw),
    ], dim=-1)
    return qside, kside


def sparse_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms | None, scale: float,
    grid: Grid, pattern: SparsePattern, kernel: GroupKernel,
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
    return _merge_lse(outs, lses, coefs)


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
    out, lse, _ = flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=0.0,
                                  softmax_scale=scale, causal=False, return_attn_probs=True)
    return out.to(q.dtype), lse.float()
