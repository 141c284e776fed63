"""Seed-paired markdown tables of one MA arm against baseline arms, across several MA sweep JSON files.

The sweep of :mod:`fewstep.benchmarks.ma_experiments` writes one JSON per call; the bar-budget runs of
``docs/results/ma_bar_budget.md`` are spread over several (one per seed or per arm). This tool merges the ``runs`` of
all files given (a run key is ``target/method/arm/seed``; a key present in two files is an error unless both records
are identical) and prints, per baseline arm:

- the per-arm means (mean ± 95 % t half-width over the seeds both arms have) and the realised CPU seconds per run;
- the seed-paired difference arm − baseline per NFE and metric: mean ± 95 % t half-width, the difference in units
  of its standard error (``z``), and the verdict of :func:`fewstep.benchmarks.ma_stats.paired` (``better``/``worse``
  when the 95 % interval excludes 0, else ``tie``).

Example (the equal-CPU table of ma_bar_budget.md)::

    python tools/ma_paired_table.py docs/results/ma_bar_budget_ring8*.json --arm "MA 0.0003 mid" \\
        --base "base@cpu-mid" "base@N" --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fewstep.benchmarks.ma_stats import LOWER_IS_BETTER, metric, paired, t_interval

METRICS: tuple[tuple[str, str], ...] = (
    ("mmd2", "MMD²"),
    ("kl_knn", "k-NN KL"),
    ("tv_knn", "k-NN TV"),
    ("loglik", "log p₀"),
)
NFES: tuple[int, ...] = (1, 2, 4)


def load_runs(files: list[Path]) -> dict[str, dict[str, Any]]:
    """Union of the ``runs`` of ``files``; conflicting duplicates raise ``SystemExit``."""
    runs: dict[str, dict[str, Any]] = {}
    for f in files:
        for key, run in json.loads(f.read_text()).get("runs", {}).items():
            if key in runs and runs[key] != run:
                raise SystemExit(f"{key} differs between files (second copy in {f})")
            runs[key] = run
    return runs


def arm_runs(
    runs: dict[str, dict[str, Any]], target: str, arm: str, seeds: list[int] | None
) -> dict[int, dict[str, Any]]:
    """{seed: run} of one arm of one target (any method), restricted to ``seeds`` when given."""
    out: dict[int, dict[str, Any]] = {}
    for key, run in runs.items():
        tag, _, name, seed = key.split("/")
        if tag == target and name == arm and (seeds is None or int(seed) in seeds):
            out[int(seed)] = run
    return out


def _fmt(x: float) -> str:
    return f"{x:+.2g}" if abs(x) < 0.01 else f"{x:+.3g}"


def _cell(m: float, hw: float) -> str:
    return f"{m:.3g} ± {hw:.2g}" if math.isfinite(hw) else f"{m:.3g}"


def means_table(arms: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> list[str]:
    """Per-arm mean ± 95 % half-width over ``seeds`` per NFE, with the CPU seconds of a run."""
    lines = [
        "| arm | steps | CPU s/run | NFE | " + " | ".join(n for _, n in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for name, runs in arms.items():
        sel = [runs[s] for s in seeds]
        cpu = t_interval([r["cpu_s_per_step"] * r["steps"] for r in sel])
        for k in NFES:
            cells = [_cell(*t_interval([metric(r, m, k) for r in sel])[:2]) for m, _ in METRICS]
            head = f"| {name} | {sel[0]['steps']} | {_cell(*cpu[:2])}" if k == 1 else "| | |"
            lines.append(f"{head} | {k} | " + " | ".join(cells) + " |")
    return lines


def paired_table(arm: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], seeds: list[int]) -> list[str]:
    """Seed-paired arm − base per NFE and metric: 'diff ± hw (z = d/SE, verdict)'."""
    lines = ["| NFE | " + " | ".join(n for _, n in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for k in NFES:
        cells = []
        for m, _ in METRICS:
            p = paired(
                {s: metric(arm[s], m, k) for s in seeds}, {s: metric(base[s], m, k) for s in seeds}, LOWER_IS_BETTER[m]
            )
            z = p["diff"] / p["se"] if p["se"] and math.isfinite(p["se"]) else math.nan
            cells.append(f"{_fmt(p['diff'])} ± {p['hw']:.2g} (z {z:+.1f}, {p['verdict']})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--target", default="ring8")
    p.add_argument("--arm", default="MA 0.0003 mid")
    p.add_argument("--base", nargs="+", default=["base@cpu-mid", "base@N"])
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the seeds every arm has")
    a = p.parse_args(argv)
    runs = load_runs(a.json)
    arms = {n: arm_runs(runs, a.target, n, a.seeds) for n in (a.arm, *a.base)}
    seeds = sorted(set.intersection(*(set(r) for r in arms.values())))
    missing = {n: sorted(set(a.seeds or seeds) - set(r)) for n, r in arms.items()}
    if not seeds or any(missing.values()):
        raise SystemExit(f"missing seeds per arm: {missing} (common: {seeds})")
    print(f"{a.target}, seeds {seeds} (n = {len(seeds)}); mean ± 95 % t half-width\n")
    print("\n".join(means_table(arms, seeds)))
    for b in a.base:
        print(f"\nSeed-paired {a.arm} − {b} (lower is better except log p₀; z = mean / SE):\n")
        print("\n".join(paired_table(arms[a.arm], arms[b], seeds)))


if __name__ == "__main__":
    main()
