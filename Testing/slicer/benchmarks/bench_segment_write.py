"""Time the Lib's MRML side of one click on a CT-sized volume (no network: a sphere session).

Prints medians of: the region write into the segment (with undo snapshot), undo, and the
whole add_point -> written cycle. Run: python3 Testing/slicer/benchmarks/bench_segment_write.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "core"))

import numpy as np  # noqa: E402
from slicer_scene import SphereSession, StubEngine, build_scene  # noqa: E402

from FastSAM3DSlicerLib.logic import InteractiveLogic  # noqa: E402


class CropSession(SphereSession):
    """A 128^3-voxel region per click, like a 1.5 mm crop on a ~1.5 mm CT."""

    HALF = 64
    RADIUS = 20.0


class CropEngine(StubEngine):
    def new_session(self):
        s = CropSession()
        self.sessions.append(s)
        return s


def main(shape=(300, 512, 512), clicks=8) -> None:
    t0 = time.perf_counter()
    scene = build_scene(
        shape_kji=shape,
        spacing=(0.8, 0.8, 1.0),
        other_block=(slice(100, 180), slice(200, 300), slice(200, 300)),
    )
    print(f"scene {shape[::-1]} (i,j,k) built in {time.perf_counter() - t0:.1f} s")
    logic = InteractiveLogic(CropEngine())
    logic.set_target(scene.volume, scene.segmentation, scene.target)
    t0 = time.perf_counter()
    logic.add_point(scene.world_of_ijk((256, 256, 150)), True)
    logic.wait()
    print(f"first click (session set-up incl. volume copy): {time.perf_counter() - t0:.3f} s")
    totals, writes, undos = [], [], []
    rng = np.random.default_rng(0)
    for _ in range(clicks):
        ijk = (
            256 + rng.integers(-40, 40),
            256 + rng.integers(-40, 40),
            150 + rng.integers(-30, 30),
        )
        t0 = time.perf_counter()
        logic.add_point(scene.world_of_ijk(ijk), bool(rng.integers(0, 2)))
        (rec,) = logic.wait()
        totals.append(time.perf_counter() - t0)
        writes.append(rec.total_s - rec.inference_s)
    for _ in range(clicks):
        t0 = time.perf_counter()
        logic.undo()
        undos.append(time.perf_counter() - t0)
    med = statistics.median
    print(
        f"per click, region 129^3: total {1000 * med(totals):.0f} ms, "
        f"MRML write incl. undo snapshot {1000 * med(writes):.0f} ms, "
        f"undo {1000 * med(undos):.0f} ms (medians of {clicks})"
    )
    logic.close()


if __name__ == "__main__":
    main()
