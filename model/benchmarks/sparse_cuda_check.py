"""Checks every sparse-attention implementation against the masked einsum on the GPU, per branch
too (output and log-sum-exp), so a wrong merge is located, not just detected.

Usage (on a CUDA machine): PYTHONPATH=model/src python3 model/benchmarks/sparse_cuda_check.py
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from fastsam3d.modeling import sparse as sa
from fastsam3d.modeling.sparse import flex


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> int:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bad = 0
    print("lse factor:", flex._lse_to_natural(True, dev))
    for g in (8, 16):
        grid = (g, g, g)
        n, h, hd = g**3, 6, 128
        q, k, v = (torch.randn(1, h, n, hd, device=dev) for _ in range(3))
        terms = tuple(0.1 * torch.randn(1, h, g, g, g, g, device=dev) for _ in range(3))
        scale = hd**-0.5
        for impl in ("flex", "flex_union"):
            pat = sa.SparsePattern(impl="einsum")
            ref = sa.sparse_attention(q, k, v, terms, scale, grid, pat)
            pat = sa.SparsePattern(impl=impl)
            out = sa.sparse_attention(q, k, v, terms, scale, grid, pat)
            err = rel(out, ref)
            bad += err > 1e-3
            print(f"grid {g}^3 {impl:10s} fp32 rel err vs masked einsum: {err:.2e}")
        for i, br in enumerate(flex._flex_plan(pat.branches, pat.flex_block, grid, dev)):
            qp, kp, vp = (x.index_select(2, br.perm) for x in (q, k, v))
            o, lse = flex._flex(
                qp, kp, vp, flex._score_mod(terms, br.coords), br.block_mask, scale, lse=True
            )
            # the same branch through the eager (unfused, natural-log) implementation
            o_ref, aux = flex_attention(
                qp,
                kp,
                vp,
                score_mod=flex._score_mod(terms, br.coords),
                block_mask=br.block_mask,
                scale=scale,
                return_aux=AuxRequest(lse=True),
            )
            fin = torch.isfinite(aux.lse)
            print(
                f"  branch {i}: out err {rel(o, o_ref):.2e}, lse err "
                f"{rel(lse[fin], aux.lse[fin]):.2e}, mean lse ratio "
                f"{float(lse[fin].mean() / aux.lse[fin].mean()):.4f}"
            )
    print("PASS" if not bad else "FAIL")
    return int(bool(bad))


if __name__ == "__main__":
    raise SystemExit(main())
