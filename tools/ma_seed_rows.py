"""Per-seed rows of MA sweep JSON files (several files, one per seed or arm), and a merged sweep JSON.

Companion of ``tools/ma_paired_table.py`` (which prints the seed means and the seed-paired differences; its
``load_runs`` merges the files here too). For every seed and NFE this prints MMD², k-NN KL, k-NN TV, mean log p₀ and the
fold fraction as stored by the sweep, one cell per metric holding the ``--arms`` in order ("a / b / c"), then the
held-out FM-on-pairs loss and the realised CPU seconds of every run. With
a preset target it also prints, per seed, what exact samples score: the k-NN KL/TV floors stored by the sweep and the
mean log p₀ of the seed's reference draws (seed + 1_000_003, n = 2000, as in
:func:`fewstep.benchmarks.ma_eval.evaluate_student`), the level above which a student's log p₀ means
over-concentration. ``--merged OUT`` writes the union of the files as one sweep JSON (``runs``, ``ratio``, the first
file's ``settings``), the input ``tools/ma_teacher_bar.py`` takes.

``python tools/ma_seed_rows.py docs/results/ma_bar_budget_aniso3*.json --target aniso3 [--merged /tmp/m.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ma_paired_table import arm_runs, load_runs  # noqa: E402

from fewstep.benchmarks.ma_stats import metric  # noqa: E402

METRICS = ("mmd2", "kl_knn", "tv_knn", "loglik", "fold")


def exact_loglik(preset: str, seeds: list[int], n: int = 2000) -> dict[int, float]:
    """Mean log p₀ of each seed's reference draws (exact samples)."""
    from fewstep.teachers.presets import load_preset

    t = load_preset(preset)
    out = {}
    for s in seeds:
        ref = t.sample(n, generator=torch.Generator().manual_seed(s + 1_000_003), dtype=torch.float64)
        out[s] = float(t.log_prob(ref, 0.0).double().mean())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--target", default="ring8")
    p.add_argument("--merged", default="", help="write the merged sweep JSON here")
    p.add_argument("--arms", nargs="+", default=["base@N", "MA 0.0003 mid", "base@cpu-mid"], help="cell order")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = load_runs(a.json)
    if a.merged:
        ratio: dict[str, float] = {}
        for f in a.json:
            ratio.update(json.loads(f.read_text()).get("ratio", {}))
        settings = json.loads(a.json[0].read_text()).get("settings", {})
        Path(a.merged).write_text(json.dumps({"settings": settings, "ratio": ratio, "runs": runs}, indent=1))
    rows = {(arm, seed): run for arm in a.arms for seed, run in arm_runs(runs, a.target, arm, None).items()}
    print(f"Cells: {' / '.join(a.arms)}\n")
    print("| seed | NFE | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for seed in sorted({s for _, s in rows}):
        for k in (1, 2, 4):
            cells = []
            for m in METRICS:
                vals = [metric(rows[(arm, seed)], m, k) if (arm, seed) in rows else None for arm in a.arms]
                cells.append(" / ".join("–" if v is None else f"{v:.3g}" for v in vals))
            print(f"| {seed} | {k} | " + " | ".join(cells) + " |")
    print("\n| arm | seed | steps | CPU s | held-out FM loss |\n|---|---|---|---|---|")
    for (arm, seed), run in sorted(rows.items(), key=lambda kv: (a.arms.index(kv[0][0]), kv[0][1])):
        print(
            f"| {arm} | {seed} | {run['steps']} | {run['cpu_s_per_step'] * run['steps']:.0f} | {run['fm_loss']:.3g} |"
        )
    seeds = sorted({s for _, s in rows})
    if ":" in a.target or a.target.endswith(".json") or not seeds:
        return
    ex = exact_loglik(a.target, seeds)
    any_run = {s: next(r for (_, s2), r in rows.items() if s2 == s) for s in seeds}
    print("\n| seed | exact samples: k-NN KL floor | k-NN TV floor | mean log p₀ |\n|---|---|---|---|")
    for s in seeds:
        e = any_run[s]["eval"]["1"]
        print(
            f"| {s} | {e.get('kl_knn_floor', float('nan')):.3g} | {e.get('tv_knn_floor', float('nan')):.3g} "
            f"| {ex[s]:.3f} |"
        )


if __name__ == "__main__":
    main()
