"""Quality vs NFE per method beside the teacher's Euler curve, one panel per target (matplotlib, optional)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.targets import EULER_NFE, STUDENT_NFE

__all__ = ["save_figure"]

FLOOR = 1e-4  # MMD² is unbiased and can be <= 0; plotted at this floor on the log axis


def save_figure(d: dict[str, Any], path: Path, max_panels: int = 16) -> str:
    """Write the figure; returns "" on success, else why there is none (matplotlib missing, nothing to plot).

    Args:
        d: The dict of :func:`~fewstep.benchmarks.leaderboard.summary.collect`.
        path: Output PNG.
        max_panels: Most targets drawn (in the leaderboard's order).

    Returns:
        An empty string, or the reason no figure was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    targets = [t for t in d["targets"] if any(r["target"] == t for r in d["rows"])][:max_panels]
    if not targets:
        return "no finished cells"
    cols = min(4, len(targets))
    rows = math.ceil(len(targets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    methods = d["methods"]
    cmap = plt.get_cmap("tab20")
    for ax, t in zip(axes.flat, targets):
        eu = d["targets"][t]["euler"]
        ks = [k for k in EULER_NFE if str(k) in eu]
        ax.plot(ks, [max(eu[str(k)]["mmd2"], FLOOR) for k in ks], "k--", lw=2, label="teacher Euler")
        for i, m in enumerate(methods):
            r = next((r for r in d["rows"] if r["method"] == m and r["target"] == t), None)
            if r is None:
                continue
            ks_m = [k for k in STUDENT_NFE if str(k) in r["nfe"]]  # an entry may be pending (stale)
            ax.plot(
                ks_m,
                [max(r["nfe"][str(k)]["mmd2"], FLOOR) for k in ks_m],
                "o-",
                ms=3,
                color=cmap(i % 20),
                label=m,
            )
        info = d["targets"][t]
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{t} (d={info['dim']}, " + (f"K={info['components']})" if info["components"] else "learned)"),
            xlabel="NFE",
            ylabel="MMD²",
        )
        ax.set_xticks(ks, [str(k) for k in ks])
    for ax in list(axes.flat)[len(targets) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 7), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""
