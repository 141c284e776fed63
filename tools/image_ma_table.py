"""Tables of the image reflow + MA comparison (docs/results/images_reflow_ma.md) from image_bench student JSONs.

``python tools/image_ma_table.py --arm base@N A0.json A1.json A2.json --arm "MA 0.01" B0.json B1.json B2.json ...``
(files in training-seed order, the same seeds in every arm; the first arm is the reference of "vs" columns unless
``--vs`` names others). Per arm and NFE: mean ± 95 % t half-width over seeds of FD, precision, recall, class
accuracy; then per arm the seed-paired difference arm − reference with its 95 % t-interval and a verdict
(better / worse / tie when the interval contains 0; a ``base*`` arm only against the first arm), via
:func:`fewstep.benchmarks.ma_stats.paired`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewstep.benchmarks.ma_stats import paired, t_interval

METRICS = (("fd", True), ("precision", False), ("recall", False), ("class_acc", False))


def load(files: list[str]) -> dict[int, dict[int, dict[str, float]]]:
    """seed index -> NFE -> metrics of one image_bench ``students`` JSON per seed."""
    return {s: {int(r["nfe"]): r for r in json.loads(Path(f).read_text())} for s, f in enumerate(files)}


def main() -> None:
    """Print the per-arm table and the paired differences as markdown."""
    p = argparse.ArgumentParser()
    p.add_argument("--arm", nargs="+", action="append", required=True, help="NAME FILE_seed0 FILE_seed1 ...")
    p.add_argument("--vs", nargs="*", default=None, help="reference arms of the paired tables (default: the first)")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    a = p.parse_args()
    arms = {x[0]: load(x[1:]) for x in a.arm}
    print("| arm | seeds | " + " | ".join(f"FD {k} NFE" for k in a.nfe) + " | "
          + " | ".join(f"P / R / acc {k}" for k in a.nfe) + " |")
    print("|---|---|" + "---|" * (2 * len(a.nfe)))
    for name, runs in arms.items():
        cells = []
        for k in a.nfe:
            m, hw, _ = t_interval([runs[s][k]["fd"] for s in runs])
            cells.append(f"{m:.2f} ± {hw:.2f}")
        for k in a.nfe:
            cells.append(" / ".join(f"{t_interval([runs[s][k][m] for s in runs])[0]:.3f}" for m, _ in METRICS[1:]))
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    for ref in a.vs or [a.arm[0][0]]:
        print(f"\nPaired arm − {ref} (mean ± 95 % t half-width over seeds; verdict for the arm):\n")
        print("| arm | NFE | " + " | ".join(m for m, _ in METRICS) + " |")
        print("|---|---|" + "---|" * len(METRICS))
        for name, runs in arms.items():
            if name == ref or (name.startswith("base") and ref != a.arm[0][0]):
                continue
            for k in a.nfe:
                cells = []
                for m, low in METRICS:
                    r = paired({s: runs[s][k][m] for s in runs}, {s: arms[ref][s][k][m] for s in arms[ref]}, low)
                    fmt = ".2f" if m == "fd" else ".3f"
                    cells.append(f"{r['diff']:+{fmt}} ± {r['hw']:{fmt}} {r['verdict']}")
                print(f"| {name} | {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
