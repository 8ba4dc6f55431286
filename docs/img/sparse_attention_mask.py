"""Draw which keys one query attends under the default 3D sparse pattern (docs picture).

    PYTHONPATH=model/src python3 docs/img/sparse_attention_mask.py

writes sparse_attention_mask.png beside this script.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from fastsam3d.modeling.sparse import SparsePattern  # noqa: E402

COLOURS = ["#f2f2f2", "#2b8cbe", "#fdae61", "#d7191c", "#000000"]


def categories(
    pattern: SparsePattern, grid: tuple[int, int, int], query: tuple[int, int, int]
) -> np.ndarray:
    """Per key: 0 not attended, 1 + index of the first branch that contains it, 4 the query."""
    gid = pattern.group_ids(grid).numpy()
    t = (query[0] * grid[1] + query[1]) * grid[2] + query[2]
    cat = np.zeros(gid.shape[1], dtype=int)
    for i in reversed(range(gid.shape[0])):
        cat[gid[i] == gid[i, t]] = i + 1
    cat[t] = len(COLOURS) - 1
    return cat.reshape(grid)


def main() -> None:
    pattern = SparsePattern()
    panels = [((16, 16, 16), (5, 6, 9), 5), ((16, 16, 16), (5, 6, 9), 6), ((8, 8, 8), (5, 2, 6), 5)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    cmap = ListedColormap(COLOURS)
    for ax, (grid, query, d) in zip(axes, panels):
        cat = categories(pattern, grid, query)
        ax.imshow(cat[d], cmap=cmap, vmin=0, vmax=len(COLOURS) - 1)
        n = int((cat > 0).sum())
        ax.set_title(f"grid {grid[0]}^3, query {query}\nslice d={d}  ({n} keys in 3D)", fontsize=9)
        ax.set_xlabel("w")
        ax.set_ylabel("h")
        ax.set_xticks(np.arange(-0.5, grid[2], 4), minor=False)
        ax.set_yticks(np.arange(-0.5, grid[1], 4), minor=False)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.grid(color="#999999", linewidth=0.5)
    labels = [f"branch {b}" for b in pattern.branches]
    handles = [Patch(color=c, label=lab) for c, lab in zip(COLOURS[1:4], labels)]
    handles.append(Patch(color=COLOURS[4], label="query"))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=4,
        bbox_to_anchor=(0.5, 0.0),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        "3D sparse attention, default pattern (block, dilation) = "
        + ", ".join(str(b) for b in pattern.branches),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
