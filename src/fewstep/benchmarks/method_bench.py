r"""Generic method benchmark: train any registered method on analytic-teacher presets and compare to the teacher.

For every (method, preset, seed) the script builds the analytic teacher (:func:`fewstep.teachers.presets.load_preset`),
an MLP student (hidden 256, depth 4 by default) in the method's parameterization, trains it for ``--steps`` steps
with :class:`fewstep.training.trainer.Trainer` on exact mixture samples (hyper-parameters: method defaults <
``configs/<method>.yaml`` < ``--set method.key=value train.key=value``; built and trained by
:mod:`fewstep.benchmarks.method_bench_recipe`), and evaluates the EMA student at 1, 2 and 4 NFE with
:mod:`fewstep.evaluation.evaluate`; the headline metric is the summed-bandwidth unbiased RBF MMD²

.. math::
    \mathrm{MMD}^2 = \sum_{h\in\{0.05,0.2,1\}} \big[\bar k_h(X,X) + \bar k_h(Y,Y) - 2\bar k_h(X,Y)\big],
    \quad k_h(x,y) = e^{-\|x-y\|^2/(2h^2)}

(2000 generated vs 2000 exact mixture samples; diagonal terms excluded). Bars: the teacher's Euler sampler at 4 and
8 NFE on the same noise seeds. Wall time per training step is the median over a short timed run and is reported
relative to ``flow_matching`` on the same network and batch size (timed once per preset).

Example (``--merge a.json b.json --out c.md`` combines runs made in separate processes)::

    python -m fewstep.benchmarks.method_bench --methods cd shortcut --presets ring8 aniso3 --seeds 0 1 2 \
        --steps 3000 --out docs/results/flowmap_b.md
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.benchmarks.method_bench_recipe import (
    build_method,
    method_config,
    parse_overrides,
    student_options,
    time_steps,
    train_method,
)
from fewstep.benchmarks.method_bench_report import merge, write_outputs
from fewstep.methods.registry import get_method
from fewstep.sampling.spec import CONSISTENCY, DETERMINISTIC, SamplerSpec, sample_with
from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = ["evaluate", "evaluate_mid", "run", "main"]


def evaluate(model: Callable[..., Tensor], teacher: GaussianMixtureTeacher, nfe: int, n: int, seed: int,
             kind: str = "flowmap") -> dict[str, float]:
    """All :mod:`fewstep.evaluation.evaluate` metrics (MMD², log-lik, KL/TV, W2, coupling, ...) at ``nfe`` evaluations.

    ``kind``: ``flowmap`` (nfe uniform deterministic jumps), ``euler`` (the teacher's Euler solver with nfe steps) or
    ``gamma1`` (multi-step consistency sampling: jump to 0, re-noise with fresh noise; MMD² etc. without KL).
    The flow-map kinds sample through :func:`fewstep.sampling.spec.sample_with` (the CLI's sampler).
    """
    from fewstep.evaluation.evaluate import evaluate_flowmap, evaluate_velocity_solver

    if kind == "euler":
        return evaluate_velocity_solver(model, teacher, "euler", nfe, n=n, seed=seed)
    return evaluate_flowmap(model, teacher, nfe=(nfe,), n=n, seed=seed, sampler=_spec(kind))[nfe]


def _spec(kind: str) -> SamplerSpec:
    """The :class:`SamplerSpec` of a sampler kind: ``gamma1`` -> gamma = 1, ``flowmap`` -> deterministic jumps."""
    if kind not in ("flowmap", "gamma1"):
        raise ValueError(f"unknown sampler kind {kind!r}; expected 'flowmap' or 'gamma1'")
    return CONSISTENCY if kind == "gamma1" else DETERMINISTIC


def _multistep_samples(model: Callable[..., Tensor], teacher: GaussianMixtureTeacher, grid: int | list[float], n: int,
                       seed: int, kind: str) -> Tensor:
    """Samples of ``model`` on ``grid`` from the evaluation noise of ``seed``: deterministic jumps (``flowmap``) or
    γ = 1 consistency sampling with a generator seeded by ``seed`` (``gamma1``)."""
    from fewstep.evaluation.evaluate import noise

    x1 = noise(n, teacher, seed).float()
    g = None if isinstance(grid, int) else grid
    return sample_with(model, x1, _spec(kind), nfe=grid if g is None else None, grid=g, seed=seed).x


def evaluate_mid(model: Callable[..., Tensor], teacher: GaussianMixtureTeacher, t_mid: float, n: int, seed: int,
                 kind: str = "flowmap") -> dict[str, float]:
    """Metrics of the 2-NFE sample on the grid (1, t_mid, 0) instead of the uniform (1, 0.5, 0).

    ``kind``: ``flowmap`` (two deterministic jumps) or ``gamma1`` (jump to 0, re-noise to t_mid with fresh noise,
    jump to 0), on the same noise as :func:`evaluate`.
    """
    from fewstep.evaluation.evaluate import evaluate_samples

    if not 0.0 < t_mid < 1.0:
        raise ValueError(f"the intermediate time must lie in (0, 1); got {t_mid}")
    return evaluate_samples(_multistep_samples(model, teacher, [1.0, t_mid, 0.0], n, seed, kind), teacher, seed=seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark grid; returns the JSON-able results dict and writes markdown + JSON to ``args.out``."""
    from fewstep.config.schema import TrainConfig
    from fewstep.teachers.presets import load_preset

    torch.set_num_threads(args.threads)
    over = parse_overrides(args.set or [])
    results: dict[str, Any] = {"commands": ["python -m fewstep.benchmarks.method_bench " + shlex.join(args.argv)],
                               "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
                               "hidden": args.hidden, "depth": args.depth, "n_eval": args.n,
                               "bars": {}, "fm_step_s": {}, "runs": []}
    for preset in args.presets:
        teacher = load_preset(preset)
        full = {k: [evaluate(teacher, teacher, k, args.n, s, kind="euler") for s in args.seeds] for k in (4, 8)}
        results["bars"][preset] = {k: [m["mmd2"] for m in v] for k, v in full.items()}
        results.setdefault("bar_metrics", {})[preset] = full
        fm = build_method("flow_matching", teacher, get_method("flow_matching").make_config(), args.hidden, args.depth)
        results["fm_step_s"][preset] = time_steps(fm, teacher, {"steps": 1, "batch_size": args.batch_size})
        for name in args.methods:
            cfg, ytrain = method_config(name, over["method"])
            net_opts = student_options(name, over["student"])
            fields = (set(TrainConfig.__dataclass_fields__)
                      - {"log_every", "eval_every", "ckpt_every", "keep_checkpoints"})
            train = {k: v for k, v in {**ytrain, **over["train"]}.items() if k in fields}
            unknown = set(over["train"]) - fields
            if unknown:
                raise ValueError(f"unknown train override(s) {sorted(unknown)}; valid: {sorted(fields)}")
            train.update(steps=args.steps, batch_size=args.batch_size)
            train.setdefault("lr", args.lr)
            cm = get_method(name).sampler.gamma == 1.0  # the method's own multi-step sampler
            for seed in args.seeds:
                torch.manual_seed(seed)
                method = build_method(name, teacher, cfg, args.hidden, args.depth, **net_opts)
                step_s = time_steps(method, teacher, train) if seed == args.seeds[0] else None
                t0 = time.perf_counter()
                student, losses = train_method(method, teacher, train, seed)
                wall = time.perf_counter() - t0
                student.eval()
                metrics = {k: evaluate(student, teacher, k, args.n, seed, "gamma1" if cm else "flowmap")
                           for k in (1, 2, 4)}
                rec = {"method": name, "preset": preset, "seed": seed,
                       "mmd2": {k: v["mmd2"] for k, v in metrics.items()},
                       "metrics": metrics, "multistep_sampler": "gamma=1 (fresh noise)" if cm else "deterministic",
                       "train_wall_s": wall, "step_s": step_s, "fm_step_s": results["fm_step_s"][preset],
                       "train": train, "student": net_opts,
                       "final_loss": statistics.fmean(losses[-5:]) if losses else None,
                       "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
                if args.mid_times:  # 2-NFE on (1, t_mid, 0) grids, same sampler kind
                    rec["mmd2_mid"] = {str(tm): evaluate_mid(student, teacher, tm, args.n, seed,
                                                             "gamma1" if cm else "flowmap")["mmd2"]
                                       for tm in args.mid_times}
                if cm:  # also the deterministic DDIM-style multi-step jumps, for reference
                    rec["mmd2_deterministic"] = {k: evaluate(student, teacher, k, args.n, seed)["mmd2"] for k in (2, 4)}
                results["runs"].append(rec)
                print(f"{name:>14s} {preset:>7s} seed {seed}: " +
                      "  ".join(f"{k}-NFE {v:.4f}" for k, v in rec["mmd2"].items()) + f"  ({wall:.0f} s)", flush=True)
    write_outputs(results, Path(args.out))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=[])
    p.add_argument("--presets", nargs="+", default=["ring8", "aniso3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n", type=int, default=2000, help="evaluation samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="overrides: method.key=value train.lr=...")
    p.add_argument("--mid-times", nargs="*", type=float, default=[],
                   help="also evaluate 2 NFE on the grid (1, t_mid, 0) for each of these t_mid")
    p.add_argument("--out", default="docs/results/method_bench.md")
    p.add_argument("--merge", nargs="+", default=None, help="combine these result JSONs into --out and exit")
    args = p.parse_args(argv)
    args.argv = argv
    if args.merge:
        return merge(args.merge, args.out)
    if not args.methods:
        raise ValueError("--methods is required (or --merge)")
    for name in args.methods:
        get_method(name)  # fail early on unknown names
    if args.steps < 1 or args.batch_size < 2 or args.n < 2:
        raise ValueError("--steps must be >= 1, --batch-size and --n >= 2")
    if any(not 0.0 < tm < 1.0 for tm in args.mid_times):
        raise ValueError(f"--mid-times must lie in (0, 1); got {args.mid_times}")
    if any(not math.isfinite(v) or v <= 0 for v in (args.lr,)):
        raise ValueError(f"--lr must be a positive number; got {args.lr}")
    return run(args)


if __name__ == "__main__":
    main()
