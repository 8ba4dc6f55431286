"""Dense vs 3D block-sparse encoder attention: latency and agreement, per token-grid size.

Times the attention op alone (q, k, v and the rel-pos terms given, as ``Attention.forward``
hands them over) for

* ``sdpa_bias``   : SDPA with the dense rel-pos bias built from the terms (the default backend)
* ``sdpa_nobias`` : SDPA without bias (a floor: what dense attention costs with no rel-pos)
* ``flex_dense``  : FlexAttention + rel-pos ``score_mod`` (the ``"flex"`` backend)
* ``sparse_flex`` : the sparse pattern, one FlexAttention BlockMask per branch + LSE merge
* ``sparse_flex_union`` : the sparse pattern as one union BlockMask
* ``sparse_flash``: grouped flash-attn path (only when flash_attn is importable)

and checks each against an fp32 reference (dense einsum, or einsum with the union mask for the
sparse methods). GPU: bf16, CUDA events after warm-up, median of ``--runs`` (default 100).
With ``--check-grad`` it also backpropagates once through the sparse flex path on the smallest
grid and compares gradients with the masked reference (training students needs that).

    PYTHONPATH=model/src python3 model/benchmarks/attention_sparsity.py --out results/
    PYTHONPATH=model/src python3 model/benchmarks/attention_sparsity.py --device cpu --quick

Needs only torch + numpy + fastsam3d.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsam3d.bench import git_commit, sample_times
from fastsam3d.modeling import sparse as sa
from fastsam3d.modeling.rel_pos import dense_bias, rel_pos_terms
from fastsam3d.modeling.sparse import flex


def timed(fn, runs: int, warmup: int, device: torch.device) -> list[float]:
    """Per-call milliseconds: the benchmark timer shared with ``fastsam3d bench``."""
    return sample_times(fn, device, runs, warmup)


def make_inputs(g: int, heads: int, hd: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(g)
    grid = (g, g, g)
    n = g**3
    q, k, v = (torch.randn(1, heads, n, hd, generator=gen) for _ in range(3))
    # tables like a trained model's (rel-pos comparable to q.k), scaled down for realism
    tables = tuple(0.05 * torch.randn(2 * g - 1, hd, generator=gen) for _ in range(3))
    q, k, v = (x.to(device) for x in (q, k, v))
    tables = tuple(t.to(device) for t in tables)
    terms32 = rel_pos_terms(q, tables, grid, grid)
    lo = tuple(x.to(dtype) for x in (q, k, v))
    terms = rel_pos_terms(lo[0], tuple(t.to(dtype) for t in tables), grid, grid)
    return grid, (q, k, v, terms32), (*lo, terms)


def reference(q, k, v, terms, scale, mask):
    """fp32 einsum reference, chunked over queries so that 24^3 fits."""
    out = torch.empty_like(q)
    n = q.shape[2]
    step = max(1, (1 << 27) // (n * q.shape[1]))
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        logits = (q[:, :, sl] * scale) @ k.transpose(-2, -1)
        if terms is not None:
            logits = logits + _bias_rows(terms, sl.start, sl.stop)
        if mask is not None:
            logits = logits.masked_fill(~mask[sl], float("-inf"))
        out[:, :, sl] = logits.softmax(-1) @ v
    return out


def _bias_rows(terms, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of dense_bias(terms) without building all N^2 of it."""
    t_d, t_h, t_w = terms
    b, h, d, hh, w, _ = t_d.shape
    rows = torch.arange(start, stop, device=t_d.device)
    qd, qh, qw = rows // (hh * w), (rows // w) % hh, rows % w
    bd = t_d[:, :, qd, qh, qw]  # (B, h, R, kw)
    bh = t_h[:, :, qd, qh]  # (B, h, R, kd, kw)
    bw = t_w[:, :, qd, qh]  # (B, h, R, kh, kw)
    bias = bd[:, :, :, None, None, :] + bh[:, :, :, :, None, :] + bw[:, :, :, None, :, :]
    return bias.reshape(b, h, len(rows), -1)


def methods(pattern: sa.SparsePattern, scale: float, grid, with_flash: bool, on_cuda: bool):
    flex = sa.SparsePattern(pattern.branches, impl="flex")
    union = sa.SparsePattern(pattern.branches, impl="flex_union")
    out = {
        "sdpa_bias": (
            False,
            lambda q, k, v, t: F.scaled_dot_product_attention(
                q, k, v, attn_mask=dense_bias(t).to(q.dtype), scale=scale
            ),
        ),
        "sdpa_nobias": (
            False,
            lambda q, k, v, t: F.scaled_dot_product_attention(q, k, v, scale=scale),
        ),
        "flex_dense": (False, lambda q, k, v, t: sa.flex_dense(q, k, v, t, scale, grid)),
        "sparse_flex": (
            True,
            lambda q, k, v, t: sa.sparse_attention(q, k, v, t, scale, grid, flex),
        ),
        "sparse_flex_union": (
            True,
            lambda q, k, v, t: sa.sparse_attention(q, k, v, t, scale, grid, union),
        ),
    }
    if on_cuda:
        # 64-token tiles match the 4^3 groups; flex may refuse tiles below its kernel block.
        b64 = sa.SparsePattern(pattern.branches, impl="flex", flex_block=64)
        out["sparse_flex_b64"] = (
            True,
            lambda q, k, v, t: sa.sparse_attention(q, k, v, t, scale, grid, b64),
        )
    if with_flash:
        out["sparse_flash"] = (
            True,
            lambda q, k, v, t: sa.sparse_grouped(
                q, k, v, t, scale, grid, pattern, sa.flash_group_kernel
            ),
        )
    return out


def block_stats(pattern: sa.SparsePattern, grid, device: torch.device) -> dict:
    """Fraction of 128x128 FlexAttention blocks computed, per implementation."""
    stats = {}
    try:
        plan = flex._flex_plan(pattern.branches, pattern.flex_block, grid, device)
        union = flex._flex_union_plan(pattern.branches, pattern.flex_block, grid, device)
        stats["sparse_flex_blocks_computed"] = sum(
            1 - bm.block_mask.sparsity() / 100 for bm in plan
        )
        stats["sparse_flex_branches_run"] = len(plan)
        stats["sparse_flex_union_blocks_computed"] = 1 - union.block_mask.sparsity() / 100
    except Exception as e:  # noqa: BLE001 - recorded, the table goes on
        stats["block_stats_error"] = repr(e)
    return stats


def check_grad(g: int, heads: int, hd: int, pattern, device: torch.device) -> dict:
    """One backward through the sparse flex path vs the masked reference (fp32)."""
    grid, (q, k, v, _), _ = make_inputs(g, heads, hd, torch.float32, device)
    tables = tuple(
        (0.05 * torch.randn(2 * g - 1, hd, device=device)).requires_grad_(True) for _ in range(3)
    )
    q = q.clone().requires_grad_(True)
    scale = hd**-0.5
    flex = sa.SparsePattern(pattern.branches, impl="flex")
    grads = []
    for impl in (flex, None):
        for t in (q, *tables):
            t.grad = None
        terms = rel_pos_terms(q, tables, grid, grid)
        if impl is None:
            out = reference(q, k, v, terms, scale, pattern.mask(grid, device))
        else:
            out = sa.sparse_attention(q, k, v, terms, scale, grid, impl)
        out.square().sum().backward()
        grads.append([t.grad.clone() for t in (q, *tables)])
    errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(*grads)]
    return {"grid": g, "grad_rel_err_q": errs[0], "grad_rel_err_tables": max(errs[1:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grids", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument(
        "--branches",
        default="4,1;8,2;16,4",
        help="sparse pattern as 'block,dilation;...' (block 0 = whole axis)",
    )
    p.add_argument("--quick", action="store_true", help="8^3 only, 5 runs (CPU smoke test)")
    p.add_argument(
        "--check-grad",
        action="store_true",
        help="also check gradients through the sparse flex path (smallest grid)",
    )
    p.add_argument("--out", type=Path, help="directory for attention_sparsity.json")
    args = p.parse_args(argv)
    if args.quick:
        args.grids, args.runs, args.warmup = [8], 5, 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    branches = tuple(tuple(int(x) for x in b.split(",")) for b in args.branches.split(";"))
    pattern = sa.SparsePattern(branches)
    scale = args.head_dim**-0.5
    with_flash = device.type == "cuda" and sa.flash_available()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    meta = {
        "benchmark": "attention_sparsity",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": gpu or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "runs": args.runs,
        "pattern": pattern.describe(),
        "flash_attn": sa.flash_available(),
    }
    print(json.dumps(meta, indent=1))
    results = []
    for g in args.grids:
        grid, (q32, k32, v32, t32), (q, k, v, terms) = make_inputs(
            g, args.heads, args.head_dim, dtype, device
        )
        mask = pattern.mask(grid, device)
        with torch.no_grad():
            ref_dense = reference(q32, k32, v32, t32, scale, None)
            ref_sparse = reference(q32, k32, v32, t32, scale, mask)
        row = {
            "grid": g,
            "tokens": g**3,
            "density": pattern.density(grid),
            **block_stats(pattern, grid, device),
        }
        if device.type == "cuda":
            torch.cuda.synchronize()
        for name, (is_sparse, fn) in methods(
            pattern, scale, grid, with_flash, device.type == "cuda"
        ).items():
            entry = dict(row, method=name)
            try:
                with torch.no_grad():
                    out = fn(q, k, v, terms)
                    ref = ref_sparse if is_sparse else ref_dense
                    if name != "sdpa_nobias":
                        entry["rel_err_vs_fp32"] = float(
                            (out.float() - ref).abs().max() / ref.abs().max()
                        )
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    ts = timed(
                        lambda fn=fn, a=(q, k, v, terms): fn(*a), args.runs, args.warmup, device
                    )
                if device.type == "cuda":
                    entry["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                entry.update(
                    median_ms=statistics.median(ts), p10_ms=_pct(ts, 10), p90_ms=_pct(ts, 90)
                )
            except Exception as e:  # noqa: BLE001 - one failing method must not hide the rest
                entry["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            results.append(entry)
            _print_row(entry)
        del ref_dense, ref_sparse, q, k, v, terms, q32, k32, v32, t32
        if device.type == "cuda":
            torch.cuda.empty_cache()
    grad = None
    if args.check_grad:
        try:
            grad = check_grad(min(args.grids), args.heads, args.head_dim, pattern, device)
        except Exception as e:  # noqa: BLE001
            grad = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        print("grad check:", grad)
    print()
    print(table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "attention_sparsity.json"
        path.write_text(json.dumps({**meta, "results": results, "grad_check": grad}, indent=1))
        print(f"wrote {path}")
    return 0


def _pct(ts: list[float], p: float) -> float:
    s = sorted(ts)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def _print_row(e: dict) -> None:
    if "error" in e:
        print(f"{e['grid']:>3}^3 {e['method']:<18} ERROR {e['error']}", file=sys.stderr)
    else:
        print(
            f"{e['grid']:>3}^3 {e['method']:<18} {e['median_ms']:9.4f} ms  "
            f"err {e.get('rel_err_vs_fp32', float('nan')):.2e}"
        )


def table(results: list[dict]) -> str:
    """Markdown table: one row per grid, one column per method (median ms)."""
    names = list(dict.fromkeys(r["method"] for r in results))
    lines = [
        "| grid (tokens) | sparse density | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for g in dict.fromkeys(r["grid"] for r in results):
        rows = {r["method"]: r for r in results if r["grid"] == g}
        first = next(iter(rows.values()))
        cells = []
        for n in names:
            r = rows.get(n)
            cells.append(
                "n/a" if r is None else "error" if "error" in r else f"{r['median_ms']:.3f} ms"
            )
        lines.append(
            f"| {g}^3 ({g**3}) | {100 * first['density']:.1f}% | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
