"""Quality bars of an MA sweep's reflow students (docs/results/ma_bar_budget.md), on the sweep's own evaluator.

The bar of docs/results/reflow.md: a k-NFE student must beat the exact teacher sampled by Euler with 4k steps
(1 NFE vs Euler 4, 2 vs 8, 4 vs 16) on MMD². Here the teacher's Euler samples use the noise and the reference
samples of :func:`fewstep.benchmarks.ma_eval.evaluate_student` for each seed (noise seed s, reference seed
s + 1_000_003, n = 2000, float64), so the teacher and the students are scored on identical draws. A bar is met only
if the students' mean + 2 standard errors is below the teacher's mean over the same seeds
(:func:`fewstep.benchmarks.image_tables.bar`; else ``tie`` or ``miss``).

``python tools/ma_teacher_bar.py SWEEP.json [--arms "base@N" ...] [--out TEACHER.json]``: prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from fewstep.benchmarks.image_tables import bar
from fewstep.benchmarks.ma_eval import density_free
from fewstep.evaluation.metrics import mmd2
from fewstep.teachers.presets import load_preset

PAIRS = ((1, 4), (2, 8), (4, 16))  # (student NFE, teacher Euler steps)
METRICS = ("mmd2", "kl_knn", "tv_knn", "loglik")


def teacher_euler(preset: str, seeds: list[int], n: int = 2000) -> dict[int, list[dict[str, float]]]:
    """Euler samples of the analytic teacher on each seed's evaluation noise; {steps: [metrics per seed]}."""
    t = load_preset(preset)
    out: dict[int, list[dict[str, float]]] = {}
    for seed in seeds:
        x1 = torch.randn(n, t.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ref = t.sample(n, generator=torch.Generator().manual_seed(seed + 1_000_003), dtype=torch.float64)
        for _, k in PAIRS:
            x, ts = x1.clone(), torch.linspace(1, 0, k + 1, dtype=torch.float64)
            for a, b in zip(ts[:-1], ts[1:], strict=True):
                x = x + (b - a) * t.velocity(x, torch.full((n,), float(a), dtype=torch.float64)).double()
            m = {"seed": seed, "mmd2": mmd2(x, ref), "loglik": float(t.log_prob(x, 0.0).double().mean())}
            m.update(density_free(x, t, ref))
            out.setdefault(k, []).append(m)
    return out


def _cell(v: list[float]) -> str:
    if len(v) < 2:
        return f"{v[0]:.3g}" if v else "–"
    return f"{statistics.mean(v):.3g} ± {statistics.stdev(v) / math.sqrt(len(v)):.2g}"


def main() -> None:
    """Teacher Euler bars on the sweep's seeds, then one row per (arm, NFE): student vs bar per metric."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep")
    p.add_argument("--preset", default="ring8")
    p.add_argument("--arms", nargs="+", default=None)
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    runs = json.loads(Path(a.sweep).read_text())["runs"]
    arms: dict[str, dict[int, dict]] = {}
    for key, run in runs.items():
        tag, _, arm, seed = key.split("/")
        if tag == a.preset.replace(":", "") and (a.arms is None or arm in a.arms):
            arms.setdefault(arm, {})[int(seed)] = run
    seeds = sorted({s for r in arms.values() for s in r})
    te = teacher_euler(a.preset, seeds)
    if a.out:
        Path(a.out).write_text(json.dumps({"preset": a.preset, "seeds": seeds, "euler": te}, indent=1))
    print("| arm | seeds | NFE | bar | " + " | ".join(f"{m}: student / teacher (verdict)" for m in METRICS) + " |")
    print("|---|---|---|---|" + "---|" * len(METRICS))
    for arm, by_seed in arms.items():
        for nfe, k in PAIRS:
            cells = []
            for m in METRICS:
                s = [r["eval"][str(nfe)][m] for r in by_seed.values()]
                tv = [e[m] for e in te[k] if e["seed"] in by_seed]
                # bar() is "lower is better"; the log-likelihood is higher-is-better, so negate both sides
                sign = -1.0 if m == "loglik" else 1.0
                verdict = bar([sign * v for v in s], sign * statistics.mean(tv))
                cells.append(f"{_cell(s)} / {_cell(tv)} ({verdict})")
            print(f"| {arm} | {len(by_seed)} | {nfe} | Euler {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
