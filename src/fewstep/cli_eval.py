r"""``fewstep eval`` and the figures of ``fewstep sample``: a student's metrics beside the teacher's own.

For each NFE K the student is sampled with the run's sampler (:class:`~fewstep.sampling.spec.SamplerSpec`) and
compared with, on the same noise and reference samples:

* the teacher's Euler solver at the same K (what K network evaluations buy without distillation),
* the teacher's adaptive solve (dopri5; the best the teacher can do),
* the floor: exact samples vs independent exact samples (the value of a perfect sampler at this n).

Analytic teachers are scored against exact mixture samples; learned teachers (``teacher.kind=run`` or data
without an analytic density) against held-out data from the run's dataset (a seed the training never draws),
with the density-free metrics only (MMD², W2, sliced W2). MMD² is the unbiased RBF estimate summed over
bandwidths {0.05, 0.2, 1}, so values at the floor may be negative.
Image runs (data ``digits8`` / ``digits16``) follow the image benchmark's protocol instead
(:mod:`fewstep.cli_eval_images`): classifier FD, precision/recall and class accuracy, the teacher's unguided Euler
at K and 4K (the image bars) and its adaptive solve, the classifier's real-vs-real floor.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.evaluation.figures import save_figure

__all__ = ["run_eval", "run_sampler", "check_nfe", "BETTER", "context_flags"]

#: Which direction is better for each metric.
BETTER: dict[str, str] = {"mmd2": "lower", "w2": "lower", "sliced_w2": "lower", "kl": "lower", "tv": "lower",
                          "mean_loglik": "closest to exact", "modes_covered": "higher", "off_mode": "lower",
                          "coupling_l2": "lower (0 = the teacher's ODE map)", "fd_digits": "lower",
                          "fd": "lower", "precision": "higher", "recall": "higher",  # fd/precision/recall: images
                          "class_acc": "higher",
                          "fold_fraction": "0 (share of samples where the jump map folds, det <= 0)",
                          "w_mean": "<= 1 (E_q[p/q]; above 1 the change-of-variables density is invalid)"}
SHOWN = ("mmd2", "w2", "sliced_w2", "mean_loglik", "kl", "tv", "fold_fraction", "w_mean", "modes_covered", "off_mode",
         "fd", "precision", "recall", "class_acc")
DEFAULT_N = 2000  # samples per metric of vector runs (image runs: the image set's floor size)
HELD_OUT_SEED = 987_654_321  # held-out data for learned teachers: a generator seed the trainer never derives


def check_nfe(nfe: Sequence[int]) -> None:
    """Every step count must be an int >= 1."""
    bad = [k for k in nfe if k < 1]
    if bad:
        raise ValueError(f"--nfe must be >= 1 (number of sampling steps); got {list(nfe)}")


def run_sampler(run: Any, gamma: float | None, grid: str | None) -> tuple[Any, list[float] | None]:
    """The run's sampler with --gamma / --grid applied; --grid is a rule name or explicit comma-separated times."""
    from fewstep.config.build import resolve_sampler
    from fewstep.sampling.spec import GRID_RULES_HELP, check_grid_rule, is_grid_rule

    if gamma is not None and not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"--gamma must lie in [0, 1]; got {gamma}")
    times = None
    kind = None
    if grid:
        if is_grid_rule(grid):
            kind = check_grid_rule(grid, "--grid")
        else:
            try:
                times = [float(v) for v in grid.split(",")]
            except ValueError:
                raise ValueError(f"--grid must be {GRID_RULES_HELP} or decreasing times like 1,0.5,0; "
                                 f"got {grid!r}") from None
            if not all(math.isfinite(v) for v in times):
                raise ValueError(f"--grid times must be finite numbers; got {grid!r}")
    own = run.sampler
    spec = resolve_sampler(run.config, own.gamma if gamma is None else gamma, kind or own.grid)
    return spec, times


def context_flags(student: dict[str, float], floor: dict[str, float], n: int) -> list[str]:
    """What a metric cannot tell at this n: W2 within the exact-vs-exact spread; log-likelihood above exact."""
    flags = []
    if "w2" in student and "w2" in floor and student["w2"] <= 1.2 * floor["w2"]:
        flags.append(f"w2 {student['w2']:.4g} is within the exact-vs-exact W2 {floor['w2']:.4g} at n={n}: "
                     "W2 cannot tell this sampler from exact samples here")
    if "mmd2" in student and "mmd2_sd" in floor and abs(student["mmd2"]) <= 2 * floor["mmd2_sd"]:
        flags.append(f"mmd2 {student['mmd2']:.3g} is within 2 sd of the exact-vs-exact floor at n={n}: "
                     "indistinguishable from exact samples by MMD²")
    if "mean_loglik" in student and "mean_loglik" in floor and student["mean_loglik"] > floor["mean_loglik"] + 0.02:
        flags.append(f"mean_loglik {student['mean_loglik']:.4g} is above the exact samples' "
                     f"{floor['mean_loglik']:.4g}: the modes are too narrow, not better")
    if student.get("fold_fraction", 0.0) > 0:
        flags.append(f"the sampler's jumps fold (det df/dx <= 0) on {student['fold_fraction']:.1%} of samples "
                     f"(E_q[p/q] = {student['w_mean']:.3g} ± {student['w_se']:.2g}): change-of-variables KL/TV "
                     "refused; kl/tv are density-free k-NN estimates"
                     + (f" (exact samples: kl {student['kl_knn_floor']:.3g}, tv {student['tv_knn_floor']:.3g})"
                        if "tv_knn_floor" in student else ""))
    elif "w_ok" in student and not student["w_ok"]:
        flags.append(f"E_q[p/q] = {student['w_mean']:.3g} ± {student['w_se']:.2g} > 1: the change-of-variables "
                     "density is not valid, kl/tv unreliable")
    return flags


def _analytic(run: Any) -> Any:
    """The analytic mixture of a run (its teacher, its MA score teacher, its data's mixture, or the preset named by
    data.name), or None."""
    from fewstep.teachers.gmm import GaussianMixtureTeacher
    from fewstep.teachers.presets import PRESETS, load_preset

    for t in (getattr(run.teacher, "inner", run.teacher), getattr(run.method, "score_teacher", None)):
        if isinstance(t, GaussianMixtureTeacher):  # score teacher: k-RF, pairs of a learned previous round
            return t
    cfg = run.config
    if run.teacher is None and cfg.data.name in PRESETS:
        return load_preset(cfg.data.name, conditional=bool(cfg.data.kwargs.get("conditional", False)))
    return None


def _floor(ref_fn: Any, metric_fn: Any, seeds: Sequence[int]) -> dict[str, float]:
    """Exact-vs-exact metrics over a few independent draws: mean and sd of MMD², mean of the rest."""
    rows = [metric_fn(ref_fn(s)) for s in seeds]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if isinstance(rows[0][k], float)}
    m = [r["mmd2"] for r in rows]
    out["mmd2_sd"] = (sum((v - out["mmd2"]) ** 2 for v in m) / max(len(m) - 1, 1)) ** 0.5
    return out


def run_eval(args: argparse.Namespace) -> int:
    """``fewstep eval``: print and write (eval.json) the student's metrics with the teacher's and the floor."""
    from fewstep.config.build import load_run
    from fewstep.config.schema import MIN_EVAL_SAMPLES
    from fewstep.data.images import IMAGE_DATASETS

    check_nfe(args.nfe)
    if args.n is not None and args.n < MIN_EVAL_SAMPLES:
        raise ValueError(f"--n must be >= {MIN_EVAL_SAMPLES}: fewer samples make MMD² and W2 estimator noise; "
                         f"got {args.n}")
    run = load_run(args.run_dir)
    student = run.student(ema=not args.raw)
    spec, times = run_sampler(run, args.gamma, args.grid)
    if times is not None:
        raise ValueError("fewstep eval takes a grid rule (--grid uniform|edm|power:P) and --nfe; explicit times are "
                         "for fewstep sample")
    if run.config.data.name in IMAGE_DATASETS:  # the image benchmark's protocol (fewstep.cli_eval_images)
        from fewstep.cli_eval_images import eval_images

        if getattr(args, "target", None):
            raise ValueError("--target is for class-conditional analytic teachers; an image run is scored against "
                             "real images with the classifier FD")
        r = eval_images(run, student, spec, args)
        args.n = r["n"]
        return _finish({**_record(run, spec, args, r["reference"], r["student"], r["teacher_euler"],
                                  r["teacher_adaptive"], r["floor"], None), "bars": r["bars"]}, args)
    if args.n is None:
        args.n = DEFAULT_N
    mix = _analytic(run)
    if getattr(args, "target", None):
        res = _eval_target(run, student, mix, spec, args)
    else:
        res = _eval_analytic(run, student, mix, spec, args) if mix is not None else _eval_data(run, student, spec, args)
    return _finish(res, args)


def _finish(res: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the record and write it to ``--out`` (default RUN/eval.json)."""
    _print(res, args)
    out = Path(args.out or Path(args.run_dir) / "eval.json")
    out.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {out}")
    return 0


def _eval_analytic(run: Any, student: Any, mix: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    from fewstep.evaluation.evaluate import evaluate_flowmap, evaluate_samples, evaluate_velocity_solver, noise

    n, seed = args.n, args.seed
    res = evaluate_flowmap(student, mix, nfe=tuple(args.nfe), n=n, seed=seed, sampler=spec)
    euler = {k: evaluate_velocity_solver(mix, mix, "euler", int(k), n=n, seed=seed) for k in args.nfe}
    adaptive = evaluate_velocity_solver(mix, mix, "dopri5", n=n, seed=seed, kl_max_dim=0)
    floor = _floor(lambda s: mix.sample(n, generator=torch.Generator().manual_seed(seed + 7919 * (s + 1)),
                                        dtype=torch.float64),
                   lambda x: evaluate_samples(x, mix, seed=seed), (0, 1, 2))
    xs = _samples(student, spec, max(args.nfe), n, seed, noise(n, mix, seed))
    fig = save_figure(xs, Path(args.run_dir) / "eval.png", f"{Path(args.run_dir).name}: {max(args.nfe)} NFE",
                      ref=mix.sample(n, generator=torch.Generator().manual_seed(seed + 1)))
    return _record(run, spec, args, "exact samples of the analytic teacher", res, euler, adaptive, floor, fig)


def _eval_target(run: Any, student: Any, mix: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--target guided_ode|tilted|mixture``: the class-conditional student against one of the three targets of
    its teacher at guidance w (``--w``, default the run's; :func:`fewstep.benchmarks.dm_targets_eval.eval_target`)."""
    from fewstep.benchmarks.dm_targets_eval import eval_target, run_guidance

    if mix is None:
        raise ValueError("--target needs a run with an analytic mixture teacher")
    w = run_guidance(run.config) if args.w is None else float(args.w)
    r = eval_target(student, mix, args.target, w, list(args.nfe), args.n, args.seed,
                    lambda k, z, c: _samples(student, spec, k, args.n, args.seed, z, c))
    return _record(run, spec, args, r["reference"], r["student"], r["teacher_euler"], r["teacher_adaptive"],
                   r["floor_exact_vs_exact"], None)


def _samples(student: Any, spec: Any, k: int, n: int, seed: int, x1: Tensor, cond: Tensor | None = None) -> Tensor:
    from fewstep.sampling.spec import sample_with

    p = next(student.parameters())
    return sample_with(student, x1.to(p.dtype), spec, int(k), seed=seed, cond=cond).x


def _eval_data(run: Any, student: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Learned teacher: every sampler scored against held-out data with density-free metrics."""
    from fewstep.config.build import build_dataset
    from fewstep.data.images import IMAGE_DATASETS
    from fewstep.evaluation.image_features import image_metrics
    from fewstep.evaluation.metrics import mmd2, sliced_w2, w2
    from fewstep.sampling.samplers import solve, solve_adaptive

    n, seed = args.n, args.seed
    ds = build_dataset(run.config.data.name, dict(run.config.data.kwargs), run.teacher)
    event = tuple(student.net.event_shape)

    def draw(s: int) -> tuple[Tensor, Tensor | None]:
        x0, labels = ds.sample(n, generator=torch.Generator().manual_seed(HELD_OUT_SEED + s))
        return x0.to(torch.float64), labels

    def held_out(s: int) -> Tensor:
        return draw(s)[0]

    # a class-conditional run is sampled with the labels of the held-out draw, so samples and reference share
    # one class distribution (cond is None for unconditional data)
    ref, cond = draw(0)

    def metrics(x: Tensor) -> dict[str, float]:
        x = x.detach().to(torch.float64).reshape(n, *event)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("samples contain NaN or inf (a diverged run)")
        out = {"mmd2": mmd2(x, ref), "w2": w2(x, ref)}
        if math.prod(event) > 2:
            out["sliced_w2"] = sliced_w2(x, ref, generator=torch.Generator().manual_seed(seed))
        if run.config.data.name in IMAGE_DATASETS:  # classifier FD, precision, recall (evaluation.image_features)
            out.update(image_metrics(run.config.data.name, x.float(), seed=seed))
        return out

    x1 = torch.randn(n, *event, generator=torch.Generator().manual_seed(seed))
    res = {k: {**metrics(_samples(student, spec, k, n, seed, x1, cond)), "nfe": float(k)} for k in args.nfe}
    teacher = run.teacher
    euler, adaptive = {}, {}
    if teacher is not None:
        vel = teacher.velocity if hasattr(teacher, "velocity") else teacher
        with torch.no_grad():
            euler = {k: {**metrics(solve(vel, x1, int(k), cond=cond).x), "nfe": float(k)} for k in args.nfe}
            a = solve_adaptive(vel, x1, rtol=1e-5, atol=1e-5, cond=cond)
        adaptive = {**metrics(a.x), "nfe": float(a.nfe)}
    floor = _floor(held_out, metrics, (1, 2, 3))
    fig = save_figure(_samples(student, spec, max(args.nfe), n, seed, x1, cond), Path(args.run_dir) / "eval.png",
                      f"{Path(args.run_dir).name}: {max(args.nfe)} NFE", ref=ref)
    return _record(run, spec, args, f"held-out {run.config.data.name} data (seed {HELD_OUT_SEED})"
                   + (", samples use its labels" if cond is not None else ""), res, euler,
                   adaptive, floor, fig)


def _record(run: Any, spec: Any, args: argparse.Namespace, reference: str, res: dict, euler: dict, adaptive: dict,
            floor: dict, fig: Path | None) -> dict[str, Any]:
    flags = {str(k): context_flags(d, floor, args.n) for k, d in res.items()}
    return {"run_dir": str(args.run_dir), "checkpoint_step": run.step, "ema": not args.raw and bool(run.ema_students),
            "sampler": spec.to_dict(), "n": args.n, "seed": args.seed, "reference": reference,
            "student": {str(k): v for k, v in res.items()}, "teacher_euler": {str(k): v for k, v in euler.items()},
            "teacher_adaptive": adaptive, "floor_exact_vs_exact": floor,
            "better": {k: BETTER[k] for k in SHOWN if k in BETTER}, "flags": flags,
            "figure": None if fig is None else str(fig)}


def _print(rec: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"loaded ckpt-{rec['checkpoint_step']} of {rec['run_dir']} ({'EMA' if rec['ema'] else 'raw'} weights); "
          f"sampler gamma={rec['sampler']['gamma']:g}, {rec['sampler']['grid']} grid; n={rec['n']}, "
          f"reference: {rec['reference']}")
    rows: list[tuple[str, dict]] = []
    for k, d in rec["student"].items():
        rows.append((f"student {k} NFE", d))
        if k in rec["teacher_euler"]:
            rows.append((f"teacher Euler {k}", rec["teacher_euler"][k]))
    rows += [(f"teacher Euler {k}", d) for k, d in rec["teacher_euler"].items() if k not in rec["student"]]
    if rec["teacher_adaptive"]:
        rows.append((f"teacher adaptive ({int(rec['teacher_adaptive'].get('nfe', 0))} NFE)", rec["teacher_adaptive"]))
    rows.append(("real vs real (floor)" if "bars" in rec else "exact vs exact (floor)", rec["floor_exact_vs_exact"]))
    cols = [m for m in SHOWN if any(m in d for _, d in rows)]
    print(f"{'':30s}" + "".join(f"{m:>14s}" for m in cols))
    for name, d in rows:
        print(f"{name:30s}" + "".join(f"{float(d[m]):14.5g}" if m in d else f"{'-':>14s}" for m in cols))
    print(f"{'better':30s}" + "".join(f"{BETTER.get(m, '?').split(' ')[0]:>14s}" for m in cols))
    for k, fl in rec["flags"].items():
        for f in fl:
            print(f"  note ({k} NFE): {f}")
    for k, b in rec.get("bars", {}).items():
        print(f"  bar ({k} NFE): student FD {b['fd']:.4g} vs teacher Euler {b['euler_nfe']} FD {b['euler_fd']:.4g}: "
              f"{'met' if b['met'] else 'missed'} (this run and seed only)")
    if rec["figure"]:
        print(f"wrote {rec['figure']}")
