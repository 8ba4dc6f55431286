"""CPU latency of the interactive session on a CT-sized volume (FastSAM3D config).

    python model/benchmarks/cpu_session.py [--threads 2] [--repeats 7] \
        [--out results/cpu_session_<machine>_<date>.json]

Measures, on a synthetic 512 x 512 x 300 int16 CT (0.75 x 0.75 x 1.0 mm):
  first mask   = crop sampling + z-norm + encoder + decoder + paste-back (a click in a new crop)
  further click = prompt encoder + decoder + paste-back (a click in a cached crop)
and the parts of each. Weights are the deterministic fixture (speed does not depend on values);
their masks fill much of the crop, so paste-back inside "first mask" / "further click" is close
to its worst case (a ~190 mm object); paste-back for objects of given sizes is timed separately.
Crop continuation is off so that each first mask is exactly one crop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from fastsam3d import geometry as geo  # noqa: E402
from fastsam3d.bench import git_commit  # noqa: E402
from fastsam3d.session import Session  # noqa: E402
from fastsam3d.testing import fixture_model  # noqa: E402
from fastsam3d.volume import Volume  # noqa: E402


def ct_volume(shape=(300, 512, 512), spacing=(0.75, 0.75, 1.0)) -> Volume:
    """Air, an elliptic body of soft tissue with a few brighter 'organs' and noise (HU)."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    rng = np.random.default_rng(0)
    body = ((i - 256) / 220.0) ** 2 + ((j - 256) / 170.0) ** 2 < 1
    arr = np.broadcast_to(np.where(body, 40, -1000).astype(np.int16), shape).copy()
    for ci, cj, ck, r, hu in [
        (180, 230, 150, 60, 120),
        (330, 250, 120, 35, 200),
        (256, 330, 200, 25, 700),
    ]:
        ball = ((i - ci) ** 2 + (j - cj) ** 2 + ((k - ck) * 1.33) ** 2) < r**2
        arr[ball] = hu
    arr += rng.integers(-20, 20, size=shape, dtype=np.int16)
    m = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    m[0, 0] = -spacing[0]  # LPS-stored like most CT: R and A flipped
    m[1, 1] = -spacing[1]
    return Volume(arr, m)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)

    vol = ct_volume()
    session = Session(fixture_model("fastsam3d"), device=args.device, propagate=False)
    t_set, _ = timed(lambda: session.set_volume(vol))
    lat = session.lattice
    centre = vol.ijk_to_ras_points([256, 256, 150])

    first, parts = [], {"crop": [], "encoder": [], "decoder": [], "paste": []}
    further, further_dec = [], []
    rng = np.random.default_rng(1)
    for r in range(args.repeats):
        session.reset()
        session._embeddings.clear()  # a click in a new crop: nothing cached
        p = centre + rng.uniform(-30, 30, 3)
        dt, res = timed(lambda p=p: session.add_point(p))
        first.append(dt)
        # parts, measured separately on the same crop
        start = lat.crop_start(p)
        t_crop, crop = timed(
            lambda s=start: geo.znormalize(geo.sample_crop(session._tensor, lat, vol.ijk_to_ras, s))
        )
        with torch.inference_mode():
            t_enc, emb = timed(lambda c=crop: session.model.image_encoder(c[None, None]))
        parts["crop"].append(t_crop)
        parts["encoder"].append(t_enc)
        st = session._state
        t_paste, _ = timed(lambda st=st: session._render(st))
        parts["paste"].append(t_paste)
        for c in range(args.clicks if r == 0 else 3):
            q = p + rng.uniform(-10, 10, 3)
            dt, _ = timed(lambda q=q, c=c: session.add_point(q, positive=c % 3 != 2))
            further.append(dt)
        tile = next(iter(session._state.tiles.values()))
        t_dec, _ = timed(
            lambda t=tile, s=start: session._decode(s, [session._state.clicks[-1]], t.logits)
        )
        further_dec.append(t_dec)
    parts["decoder"] = further_dec

    med = {k: statistics.median(v) * 1000 for k, v in parts.items()}
    mins = {k: min(v) * 1000 for k, v in parts.items()}

    # Paste-back cost depends on the object's size, not the network: time it for spheres of
    # given diameters (logits injected into the current crop), as a further click would.
    paste_by_size = {}
    tile = next(iter(session._state.tiles.values()))
    knots = torch.arange(geo.LOWRES, dtype=torch.float32) * 4 + 1.5
    d2 = sum(g**2 for g in torch.meshgrid(*(knots - 64,) * 3, indexing="ij"))
    for diameter_mm in (30, 60, 120, 190):
        r = diameter_mm / 2 / geo.SPACING
        fake = (r - d2.sqrt())[None, None].to(session.device)
        state = type(session._state)(tiles={tile.start: type(tile)(tile.start, fake)})
        session._last_region = None
        times = [timed(lambda st=state: session._render(st))[0] for _ in range(5)]
        res = session._render(state)
        paste_by_size[f"{diameter_mm}mm"] = {
            "ms_median": round(statistics.median(times) * 1000, 1),
            "region_voxels": int(np.prod(res.mask.shape)),
        }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(HERE),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": str(session.device)
        + (f" ({torch.cuda.get_device_name()})" if session.device.type == "cuda" else ""),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "volume": {
            "shape_kji": list(vol.shape),
            "dtype": str(vol.array.dtype),
            "spacing_ijk_mm": vol.spacing.round(3).tolist(),
        },
        "model": "fastsam3d (fixture weights)",
        "set_volume_ms": round(t_set * 1000, 1),
        "first_mask_ms_median": round(statistics.median(first) * 1000, 1),
        "first_mask_ms_min": round(min(first) * 1000, 1),
        "first_mask_ms_all": [round(x * 1000, 1) for x in first],
        "further_click_ms_median": round(statistics.median(further) * 1000, 1),
        "further_click_ms_min": round(min(further) * 1000, 1),
        "further_click_ms_p90": round(float(np.percentile(further, 90)) * 1000, 1),
        "parts_ms_median": {k: round(v, 1) for k, v in med.items()},
        "parts_ms_min": {k: round(v, 1) for k, v in mins.items()},
        "first_mask_region_voxels": int(np.prod(res.mask.shape)),
        "paste_ms_by_object_diameter": paste_by_size,
        "goals_ms": {"first_mask": 300, "further_click": 30},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
