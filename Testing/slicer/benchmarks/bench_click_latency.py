"""Click latency through the Lib with the real fastsam3d.Session (fixture-weight network).

First click (crop sampling + encoder + decoder + write) and refinement clicks in the same crop
(decoder + write), medians; prints the device. The fixture weights make the mask arbitrary,
the timing is what counts. Run: python3 Testing/slicer/benchmarks/bench_click_latency.py [cuda]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "core"))

from slicer_scene import build_scene  # noqa: E402

from FastSAM3DSlicerLib.engine import FastSAM3DEngine  # noqa: E402
from FastSAM3DSlicerLib.logic import InteractiveLogic  # noqa: E402


def main(device: str = "cpu", refinements: int = 5) -> None:
    import fastsam3d.testing

    warnings.simplefilter("ignore", RuntimeWarning)
    engine = FastSAM3DEngine.from_model(
        fastsam3d.testing.fixture_model("fastsam3d", device), device=device, propagate=False
    )
    scene = build_scene(shape_kji=(130, 256, 256), spacing=(1.0, 1.0, 1.3))
    logic = InteractiveLogic(engine)
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    t0 = time.perf_counter()
    logic.add_point(scene.world_of_ijk((128, 128, 65)), True)
    (first,) = logic.wait()
    wall_first = time.perf_counter() - t0
    totals, nets = [], []
    for n in range(refinements):
        logic.add_point(scene.world_of_ijk((120 + 3 * n, 130, 64)), n % 2 == 0)
        (rec,) = logic.wait()
        totals.append(rec.total_s)
        nets.append(rec.inference_s)
    med = statistics.median
    print(f"device {engine.device_info.description}; volume 256x256x130")
    print(f"first click {1000 * wall_first:.0f} ms (network {1000 * first.inference_s:.0f} ms)")
    print(
        f"refinement clicks: {1000 * med(totals):.0f} ms (network {1000 * med(nets):.0f} ms),"
        f" median of {refinements}"
    )
    logic.close()


if __name__ == "__main__":
    main(*sys.argv[1:2])
