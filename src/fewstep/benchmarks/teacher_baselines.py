r"""Teacher baselines: the exact analytic teacher sampled by Euler, Heun and an adaptive solver.

For each preset and seed, noise :math:`x_1\sim N(0,I)` (``evaluation.noise(n, teacher, seed)``) is pushed to
t=0 by Euler (1, 2, 4, 8, 16 steps), Heun (1, 2, 4, 8 steps, 2 NFE each) and dopri5 (rtol = atol = 1e-5), and
every metric of :func:`fewstep.evaluation.evaluate.evaluate_samples` is measured against independent exact mixture
samples; ``exact samples`` is the floor (a second independent set of exact samples). Coupling errors are
relative to the adaptive endpoint from the same noise; KL/TV use the exact log-density of each sampler (2-D).
Results are mean ± std over seeds.

Usage::

    python -m fewstep.benchmarks.teacher_baselines --presets ring8 aniso3 digits --seeds 0 1 2 --n 2000 \
        --out docs/results/teacher.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fewstep.evaluation.digit_features import digit_feature_net, frechet_digits_floor
from fewstep.evaluation.evaluate import (
    evaluate_samples,
    evaluate_velocity_solver,
    noise,
    reference_samples,
    teacher_endpoint,
)
from fewstep.teachers.presets import PRESETS, load_preset

COLUMNS = ("nfe", "mmd2", "mean_loglik", "modes_covered", "off_mode", "w2", "sliced_w2", "coupling_l2", "kl", "tv",
           "fold_fraction", "w_mean", "fd_digits", "fd_digits_real")  # fold/w_mean: docs/methods.md §7
FLOOR_SEED_OFFSET = 2_000_003


def run_preset(name: str, seeds: list[int], n: int, euler: list[int], heun: list[int], rtol: float,
               log: Any = print) -> dict[str, dict[str, list[float]]]:
    """All rows for one preset: {row label: {metric: [value per seed]}} (plus ``wall_s``)."""
    teacher = load_preset(name)
    rows: dict[str, dict[str, list[float]]] = {}

    def add(label: str, metrics: dict[str, float], wall: float) -> None:
        row = rows.setdefault(label, {})
        for k, v in {**metrics, "wall_s": wall}.items():
            row.setdefault(k, []).append(float(v))

    for seed in seeds:
        x1 = noise(n, teacher, seed)
        ref = reference_samples(teacher, n, seed)
        t0 = time.time()
        x_t, nfe_ref = teacher_endpoint(teacher, x1, rtol=rtol, atol=rtol)
        t_ref = time.time() - t0
        exact = teacher.sample(n, generator=torch.Generator().manual_seed(seed + FLOOR_SEED_OFFSET),
                               dtype=torch.float64)
        t0 = time.time()
        add("exact samples (floor)", {"nfe": 0.0, **evaluate_samples(exact, teacher, reference=ref, seed=seed)},
            time.time() - t0)
        configs = [("euler", k) for k in euler] + [("heun", k) for k in heun] + [("dopri5", 0)]
        for method, steps in configs:
            t0 = time.time()
            if method == "dopri5" and teacher.dim > 2:  # no KL in high dimension: reuse the reference solve
                m = {**evaluate_samples(x_t, teacher, reference=ref, x_teacher=x_t, seed=seed), "nfe": float(nfe_ref)}
            else:
                m = evaluate_velocity_solver(teacher, teacher, method, steps if steps else 1, n=n, seed=seed, rtol=rtol,
                                             atol=rtol, x_teacher=x_t, reference=ref)
            wall = time.time() - t0 + (t_ref if method == "dopri5" else 0.0)
            label = f"{method} {steps} steps" if steps else f"dopri5 (rtol=atol={rtol:g})"
            add(label, m, wall)
            log(f"[{name} seed {seed}] {label:28s} nfe={m['nfe']:5.0f} mmd2={m['mmd2']:.4g} "
                f"loglik={m['mean_loglik']:.4g} w2={m['w2']:.4g} " + (f"kl={m['kl']:.4g} " if "kl" in m else "")
                + f"({wall:.1f}s)")
    return rows


def _fmt(vals: list[float]) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        return "inf" if bool((t == float("inf")).all()) else "/".join(f"{v:.3g}" for v in vals)
    mean = float(t.mean())
    std = float(t.std()) if t.numel() > 1 else 0.0
    if abs(mean) >= 1000 or (0 < abs(mean) < 1e-3) or (mean == 0 and std > 0 and std < 1e-3):
        return f"{mean:.2e} ± {std:.1e}"
    return f"{mean:.4g} ± {std:.2g}"


def _num(v: float) -> float | str:
    """JSON-safe number: non-finite values become the strings 'inf', '-inf', 'nan'."""
    return v if math.isfinite(v) else str(v)


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table of one preset (mean ± std over seeds; NFE as an integer)."""
    cols = [c for c in COLUMNS if any(c in r for r in rows.values())]
    lines = ["| sampler | " + " | ".join(cols) + " | wall s |", "|---" * (len(cols) + 2) + "|"]
    for label, r in rows.items():
        cells = []
        for c in cols:
            if c not in r:
                cells.append("–")
            elif c == "nfe":
                cells.append(f"{sum(r[c]) / len(r[c]):.0f}")
            else:
                cells.append(_fmt(r[c]))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(r['wall_s']) / len(r['wall_s']):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run every preset, print the tables and write markdown + JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["ring8", "aniso3", "digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--euler", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--heun", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--rtol", type=float, default=1e-5, help="rtol = atol of the adaptive reference (dopri5)")
    p.add_argument("--out", type=str, default="docs/results/teacher.md")
    args = p.parse_args(argv)
    unknown = [x for x in args.presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    torch.set_num_threads(1)
    command = "python -m fewstep.benchmarks.teacher_baselines " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    results: dict[str, Any] = {}
    for name in args.presets:
        results[name] = run_preset(name, args.seeds, args.n, args.euler, args.heun, args.rtol)
        print(f"\n## {name}\n\n{table(results[name])}\n", flush=True)
    extra: dict[str, float] = {}
    if "digits" in args.presets:
        extra["digit_classifier_test_accuracy"] = digit_feature_net()[1]
        extra["fd_digits_real_vs_real_898"] = frechet_digits_floor(898)
    md = [f"# Teacher baselines\n\nCommand: `{command}`\n",
          f"Seeds {args.seeds}, n = {args.n} samples per seed, mean ± std over seeds, torch {torch.__version__}, "
          f"1 CPU thread, total wall {time.time() - t_start:.0f} s.\n",
          "Metrics (see `fewstep.evaluation.metrics`): `mmd2` unbiased RBF MMD² summed over bandwidths "
          "{0.05, 0.2, 1.0}×√(d/2) "
          "vs independent exact samples; `mean_loglik` exact mean log p₀; `modes_covered` / `off_mode` (Mahalanobis "
          "beyond the 3-std χ² quantile); `w2` exact OT (POT); `sliced_w2` (d > 2); `coupling_l2` mean ‖x − x_ref‖ "
          "to the dopri5 endpoint from the same noise; `kl`, `tv` = KL(q‖p₀), TV of the sampler's exact pushforward "
          "by importance sampling (2-D only; one Euler step is singular, KL = inf); `fd_digits` Fréchet distance in "
          "digit-classifier features vs mixture samples, `fd_digits_real` vs the 1797 real digits. The `exact "
          "samples` row is the floor: a second set of exact mixture samples.\n"]
    for k, v in extra.items():
        md.append(f"- {k}: {v:.4g}")
    for name in args.presets:
        md.append(f"\n## {name}: {PRESETS[name]}\n\n{table(results[name])}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    payload = {"command": command, "seeds": args.seeds, "n": args.n, "extra": extra,
               "results": {k: {r: {m: {"values": [_num(x) for x in v], "mean": _num(sum(v) / len(v))}
                                   for m, v in row.items()} for r, row in res.items()} for k, res in results.items()}}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return payload


if __name__ == "__main__":
    main()
