"""Every CPU path side by side in one process (issue 14), plus int8 agreement with fp32.

    python model/benchmarks/cpu_paths.py --threads 2 --repeats 15 \
        --out results/cpu_paths_<machine>_<date>.json
        [--accuracy] [--volumes mni152,mricron,invesalius]

Timing (``fastsam3d.bench``, FastSAM3D config, fixture weights, 512x512x300 CT session):
``reference`` (the public code's kernels, fp32), ``exact`` (our fp32), ``fast`` (what
``Runner(precision="auto")`` picks on this CPU), ``int8`` (ONNX Runtime int8 encoder + PyTorch
click), ``ort-fp32`` / ``ort-int8`` (``Runner(backend="onnxruntime")``). Medians; the machine's
load average is recorded before and after (a shared machine makes medians noisy).

Click variants (``--click``, issue 14's click <= 10 ms): the click (prompt encoder + decoder) in
its plain form (the decoder's cross attention projected on the image side, the upscaling as
transposed convolutions: the code before the exact rewrites, switched back per module as the
ONNX export does) against the default (folded attention, upscaling as GEMMs), called in turn in
one process so both see the same machine load: wall ms per thread count, CPU ms of one thread
(``time.thread_time``: what other jobs on a shared machine disturb least), the 128^3 upsample
(``geometry.upsample_logits``) and the rewrites' agreement with the plain form.

Accuracy (``--accuracy``): int8 against fp32 on the parity crop and on crops of real volumes
(nilearn's MNI152 T1; Debian ``mricron-data``'s ch2 brain; Debian ``invesalius-examples``' head
CT), clicks at the crop centre and off-centre: embedding and logits relative error and the Dice
of the 128^3 masks; and ONNX Runtime fp32 against PyTorch fp32.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from fastsam3d import bench  # noqa: E402
from fastsam3d import geometry as geo  # noqa: E402
from fastsam3d.fastpath import Runner, cpu_has_fast_bf16  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402

MODES = ("reference", "exact", "fast", "int8", "ort-fp32", "ort-int8")
STAGES = ("encoder/fastsam3d", "click", "click+paste", "first_mask", "further_click")
GOALS = {"first_mask": 300.0, "click": 10.0}  # ms on 2 AVX2 threads (issue 14)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_flags() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set()
    model = ""
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
    )
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "isa_cap_env": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ
        },
        "flags": {f: f in flags for f in wanted},
    }


def time_modes(modes: tuple[str, ...], repeats: int, warmup: int) -> dict:
    """One bench.run over every mode (same process, same volume), load before and after."""
    before = load()
    t0 = time.perf_counter()
    res = bench.run(
        models=("fastsam3d",),
        device="cpu",
        repeats=repeats,
        warmup=warmup,
        modes=modes,
        batch=0,
        session=True,
    )
    res["load"] = {"before": before, "after": load(), "seconds": round(time.perf_counter() - t0, 1)}
    return res


# --- accuracy -------------------------------------------------------------------------------
def real_volumes(names: list[str]) -> dict:
    """name -> (array [k, j, i] float32, ijk_to_ras) for what is installed here."""
    vols = {}
    if "mni152" in names:
        try:
            from nilearn import datasets

            img = datasets.load_mni152_template(resolution=1)
            vols["mni152_t1"] = (
                np.asarray(img.get_fdata(), np.float32).transpose(2, 1, 0),
                img.affine,
            )
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"MNI152 unavailable: {exc}")
    if "mricron" in names:
        import nibabel as nib

        for path in sorted(glob.glob("/usr/share/mricron/templates/ch2.nii*"))[:1]:
            img = nib.load(path)
            vols["mricron_ch2"] = (
                np.asarray(img.get_fdata(), np.float32).transpose(2, 1, 0),
                img.affine,
            )
    if "invesalius" in names:
        vols.update(invesalius_ct())
    return vols


def invesalius_ct() -> dict:
    """Debian invesalius-examples' head CT: Cranium.inv3 is a tar.gz with main.plist (shape,
    spacing, dtype) and matrix.dat (raw int16, [k, j, i]). Identity directions assumed."""
    import plistlib
    import tarfile
    import tempfile

    path = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
    if not path.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile() and Path(m.name).name in ("main.plist", "matrix.dat")
        ]
        for m in members:
            tar.extract(m, tmp, filter="data")
        main = next(Path(tmp).rglob("main.plist"))
        meta = plistlib.loads(main.read_bytes())
        mat = meta["matrix"]
        arr = np.fromfile(main.parent / mat["filename"], dtype=mat["dtype"])
        arr = arr.reshape(mat["shape"]).astype(np.float32)
    affine = np.diag([*map(float, meta["spacing"]), 1.0])
    return {"invesalius_head_ct": (arr, affine)}


def crops_of(arr: np.ndarray, affine: np.ndarray) -> list[torch.Tensor]:
    """Normalised 128^3 crops at the volume centre and 25 mm towards two corners."""
    vol = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    lattice = geo.Lattice.for_volume(affine, arr.shape)
    centre = affine[:3, :3] @ ((np.array(arr.shape[::-1]) - 1) / 2) + affine[:3, 3]
    out = []
    for off in ((0, 0, 0), (25, 20, 15), (-25, -20, 10)):
        start = lattice.crop_start(centre + np.array(off, float))
        out.append(geo.znormalize(geo.sample_crop(vol, lattice, affine, start))[None, None])
    return out


def agreement(runners: dict, crop: torch.Tensor) -> dict:
    """int8 and ort-fp32 against exact fp32 on one crop, three clicks (two with a mask)."""
    exact = runners["exact"]
    e32 = exact.encode(crop)
    res = {}
    for name in ("int8", "ort-fp32"):
        r = runners[name]
        e = r.encode(crop)
        worst = {
            "embedding_rel": float((e - e32).norm() / e32.norm()),
            "logits_rel": 0.0,
            "dice_min": 1.0,
        }
        prev32 = prev = torch.zeros(1, 1, 32, 32, 32)
        for pt in ((64, 64, 64), (40, 70, 60), (80, 50, 72)):
            c = torch.tensor([[pt]], dtype=torch.float32)
            lab = torch.ones(1, 1, dtype=torch.long)
            a, _ = exact.click(e32, c, lab, prev32)
            b, _ = r.click(e, c, lab, prev)
            big = [F.interpolate(t, size=128, mode="trilinear") > 0 for t in (a, b)]
            inter = float((big[0] & big[1]).sum())
            total = float(big[0].sum() + big[1].sum())
            d = 1.0 if total == 0 else 2 * inter / total
            worst["logits_rel"] = max(worst["logits_rel"], float((a - b).norm() / a.norm()))
            worst["dice_min"] = min(worst["dice_min"], d)
            worst.setdefault("mask_voxels", []).append(int(big[0].sum()))
            prev32, prev = a, b
        res[name] = worst
    return res


def accuracy(volume_names: list[str], parity: Path | None) -> dict:
    model = fixture_model("fastsam3d")
    runners = {
        "exact": Runner(model, "cpu", "fp32"),
        "int8": Runner(model, "cpu", "int8"),
        "ort-fp32": Runner(model, "cpu", "fp32", backend="onnxruntime"),
    }
    cases: dict = {}
    if parity is not None and parity.exists():
        g = np.load(parity)
        cases["parity_input"] = agreement(runners, torch.from_numpy(g["input"]))
    for name, (arr, affine) in real_volumes(volume_names).items():
        for i, crop in enumerate(crops_of(arr, affine)):
            cases[f"{name}/crop{i}"] = agreement(runners, crop)
            print(name, i, json.dumps(cases[f"{name}/crop{i}"]), flush=True)
    summary = {}
    for path in ("int8", "ort-fp32"):
        vals = [c[path] for c in cases.values()]
        summary[path] = {
            "dice_min": min(v["dice_min"] for v in vals),
            "logits_rel_max": max(v["logits_rel"] for v in vals),
            "embedding_rel_max": max(v["embedding_rel"] for v in vals),
            "cases": len(vals),
        }
    return {"cases": cases, "summary": summary}


def click_variants(repeats: int, threads: tuple[int, ...], parity: Path | None) -> dict:
    """Plain vs rewritten click, interleaved call by call (see the module docstring)."""
    from fastsam3d.modeling.mask_decoder import MaskDecoder3D
    from fastsam3d.modeling.transformer import Attention

    model = fixture_model("fastsam3d")
    runner = Runner(model, "cpu", "fp32")

    def plain(on: bool) -> None:
        for m in model.modules():
            if isinstance(m, Attention):
                m.fold = not on
            if isinstance(m, MaskDecoder3D):
                m.gemm_upscaling = not on

    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 384, 8, 8, 8, generator=g)
    coords, labels, mask = bench._click_inputs(torch.device("cpu"))
    variants = ("plain", "rewrites")
    wall = {(t, v): [] for t in threads for v in variants}
    cpu = {v: [] for v in variants}
    before = load()
    for i in range(repeats + 3):
        for t in threads:
            torch.set_num_threads(t)
            for v in variants:
                plain(v == "plain")
                runner.click(emb, coords, labels, mask)  # keeps the thread pool warm
                t0, c0 = time.perf_counter(), time.thread_time()
                runner.click(emb, coords, labels, mask)
                t1, c1 = time.perf_counter(), time.thread_time()
                if i >= 3:
                    wall[t, v].append((t1 - t0) * 1e3)
                    if t == 1:
                        cpu[v].append((c1 - c0) * 1e3)
    plain(False)

    def stats(ts: list[float]) -> dict:
        ts = sorted(ts)
        return {
            "median_ms": statistics.median(ts),
            "p25_ms": ts[len(ts) // 4],
            "min_ms": ts[0],
            "runs": len(ts),
        }

    res: dict = {
        "wall": {f"{t} threads": {v: stats(wall[t, v]) for v in variants} for t in threads},
        "cpu_1thread": {v: stats(cpu[v]) for v in variants},
        "load": {"before": before, "after": load()},
    }
    low, _ = runner.click(emb, coords, labels, mask)
    for t in threads:
        torch.set_num_threads(t)
        res["wall"][f"{t} threads"]["upsample_128"] = bench.time_fn(
            lambda: geo.upsample_logits(low), torch.device("cpu"), repeats, 3
        )
    # agreement of the rewrites with the plain form: parity crop prompts and random ones
    cases = [(coords, labels, mask, False), (coords, labels, None, True)]
    if parity is not None and parity.exists():
        gold = np.load(parity)
        emb_p = runner.encode(torch.from_numpy(gold["input"]))
        for pts, lab in (("points1", "labels1"), ("points3", "labels3")):
            c, lb = torch.from_numpy(gold[pts]), torch.from_numpy(gold[lab])
            cases.append((c, lb, torch.zeros(1, 1, 32, 32, 32), False))
    worst = {"logits_rel_max": 0.0, "iou_abs_max": 0.0, "dice_min": 1.0, "cases": len(cases)}
    for k, (c, lb, m, multi) in enumerate(cases):
        e = emb if k < 2 else emb_p
        a, ia = runner.click(e, c, lb, m, multi)
        plain(True)
        b, ib = runner.click(e, c, lb, m, multi)
        plain(False)
        big = [geo.upsample_logits(t[:1, :1]) > 0 for t in (a, b)]
        total = float(big[0].sum() + big[1].sum())
        dice = 1.0 if total == 0 else 2 * float((big[0] & big[1]).sum()) / total
        worst["logits_rel_max"] = max(worst["logits_rel_max"], float((a - b).norm() / b.norm()))
        worst["iou_abs_max"] = max(worst["iou_abs_max"], float((ia - ib).abs().max()))
        worst["dice_min"] = min(worst["dice_min"], dice)
    res["agreement"] = worst
    return res


def click_table(res: dict) -> str:
    lines = [
        "| click (ms) | plain: median / p25 / min | rewrites: median / p25 / min |",
        "|---|---|---|",
    ]
    rows = [(k, v) for k, v in res["wall"].items()] + [("CPU time, 1 thread", res["cpu_1thread"])]
    for name, r in rows:
        cells = [
            " / ".join(bench._fmt(r[v][q]) for q in ("median_ms", "p25_ms", "min_ms"))
            for v in ("plain", "rewrites")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ups = ", ".join(
        f"{k} {bench._fmt(v['upsample_128']['median_ms'])}" for k, v in res["wall"].items()
    )
    lines.append(f"\n128^3 upsample (median ms): {ups}; load {res['load']}")
    lines.append(f"agreement of the rewrites with the plain form: {res['agreement']}")
    return "\n".join(lines)


def table(out: dict) -> str:
    stages = out["timing"]["stages"]
    modes = [m for m in MODES if any(m in stages.get(s, {}) for s in STAGES)]
    lines = [
        "| stage | " + " | ".join(f"{m} (ms)" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for s in STAGES:
        cells = []
        for m in modes:
            r = stages.get(s, {}).get(m)
            cells.append("-" if r is None else bench._fmt(r["median_ms"]))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--click", action="store_true", help="plain vs rewritten click (see above)")
    ap.add_argument("--click-repeats", type=int, default=60)
    ap.add_argument("--volumes", default="mni152,mricron,invesalius")
    ap.add_argument(
        "--parity", type=Path, default=HERE.parents[2] / "shared" / "parity" / "parity.npz"
    )
    ap.add_argument("--label", default=platform.node())
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {
        "label": args.label,
        "cpu": cpu_flags(),
        "threads": args.threads,
        "native_bf16": cpu_has_fast_bf16(),
        "load_start": load(),
    }
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    fast = Runner(
        fixture_model("fastsam3d", depth=1, embed_dim=48, num_heads=1, num_attn_free_blocks=1),
        "cpu",
    )
    out["auto_precision"] = fast.precision
    modes = tuple(m for m in args.modes.split(",") if m)
    out["timing"] = time_modes(modes, args.repeats, args.warmup) if modes else {"stages": {}}
    medians = {
        s: {m: r["median_ms"] for m, r in v.items()} for s, v in out["timing"]["stages"].items()
    }
    out["medians_ms"] = medians
    out["goals_2threads"] = {
        f"{s} <= {lim} ms": {m: v <= lim for m, v in medians[s].items()}
        for s, lim in GOALS.items()
        if s in medians
    }
    if args.accuracy:
        out["accuracy"] = accuracy(args.volumes.split(","), args.parity)
    if args.click:
        threads = (1, args.threads) if args.threads != 1 else (1,)
        out["click_variants"] = click_variants(args.click_repeats, threads, args.parity)
        torch.set_num_threads(args.threads)
    out["load_end"] = load()
    text = table(out)
    if args.click:
        text += "\n\n" + click_table(out["click_variants"])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
