r"""``fewstep eval`` on an image run: the image benchmark's protocol, so the CLI prints the numbers of the docs.

The protocol is the one of :mod:`fewstep.benchmarks.image_bench` (``docs/results/images.md``): evaluation noise
:math:`x_1 \sim N(0, I)` from generator seed ``--seed``, balanced labels :math:`c_i = i \bmod K` for a
class-conditional student, ``n`` samples (default the set's floor size, 898 for ``digits8``) scored by
:func:`fewstep.evaluation.image_features.image_metrics` (classifier FD, improved precision/recall, class
accuracy) against ``n`` real images drawn with the same seed. Beside the student at each NFE K: the teacher's
**unguided** Euler at K and at 4K (the image bars: a K-step student should beat 4K Euler steps) and its adaptive
dopri5 solve (rtol 1e-4), on the same noise and labels; the floor is the classifier's real-vs-real floor at the same
``n`` (FD is biased upward at small n, so a floor at another n would not be comparable).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fewstep.data.images import real_images
from fewstep.evaluation.image_features import FLOOR_N, eval_noise, fd_floor, image_metrics, load_classifier
from fewstep.sampling.samplers import solve, solve_adaptive
from fewstep.sampling.spec import sample_with

__all__ = ["BAR_FACTOR", "eval_images", "image_bars", "real_floor", "teacher_solves"]

#: The image bars compare a K-step student with the teacher's Euler at BAR_FACTOR * K steps.
BAR_FACTOR = 4


def image_bars(student: dict[str, dict[str, float]], euler: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per student NFE K: its FD, the teacher's Euler-4K FD and whether the student's is lower (this run only;
    the docs' verdicts take mean ± 2 standard errors over training seeds)."""
    out = {}
    for k, row in student.items():
        ref = euler.get(str(BAR_FACTOR * int(float(k))))
        if ref is not None and "fd" in row:
            out[k] = {"euler_nfe": BAR_FACTOR * int(float(k)), "euler_fd": ref["fd"], "fd": row["fd"],
                      "met": bool(row["fd"] < ref["fd"])}
    return out


def teacher_solves(teacher: Any, x1: torch.Tensor, cond: torch.Tensor | None, steps: Sequence[int],
                   metrics: Callable[[torch.Tensor], dict[str, float]], guidance: float = 1.0,
                   rtol: float = 1e-4) -> tuple[dict[int, dict[str, float]], dict[str, float], int]:
    """The protocol's teacher rows: ``metrics`` of the teacher's Euler solve at each step count and of its adaptive
    dopri5 solve (atol = rtol), from the noise ``x1`` with labels ``cond`` and guidance w (1: unguided).

    Args:
        teacher: A teacher with ``velocity(x, t, cond, guidance)`` (or the velocity callable itself).
        x1: Evaluation noise, shape (n, *event_shape).
        cond: Labels of the rows, or None.
        steps: Euler step counts.
        metrics: Sample metrics, e.g. :func:`~fewstep.evaluation.image_features.image_metrics` bound to the set.
        guidance: CFG weight of the teacher's velocity.
        rtol: Relative (and absolute) tolerance of the adaptive solve.

    Returns:
        Euler metrics by step count, the adaptive solve's metrics, and its number of network evaluations.
    """
    vel = teacher.velocity if hasattr(teacher, "velocity") else teacher
    euler = {}
    with torch.no_grad():
        for k in steps:
            euler[int(k)] = metrics(solve(vel, x1, int(k), method="euler", cond=cond, guidance=guidance).x)
        a = solve_adaptive(vel, x1, rtol=rtol, atol=rtol, cond=cond, guidance=guidance)
    return euler, metrics(a.x), int(a.nfe)


def real_floor(name: str, n: int) -> dict[str, float]:
    """The real-vs-real floor (FD, precision, recall) at sample size ``n``: the shipped one at its own size, else
    :func:`~fewstep.evaluation.image_features.fd_floor` at ``n`` (two disjoint halves of the set); empty when ``n``
    exceeds half the set (no two disjoint draws of that size).
    """
    meta = load_classifier(name)[1]
    if n == int(meta.get("floor_n", FLOOR_N[name])) and "floor_fd" in meta:
        return {m: float(meta[f"floor_{m}"]) for m in ("fd", "precision", "recall") if f"floor_{m}" in meta}
    return fd_floor(name, n) if n <= real_images(name, "all")[0].shape[0] // 2 else {}


def eval_images(run: Any, student: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of an image run's student, the teacher's Euler (K and 4K) and adaptive solves, and the floor.

    Args:
        run: The loaded run (:func:`fewstep.config.build.load_run`).
        student: The student flow map to sample (EMA or raw, as ``fewstep eval`` chose).
        spec: The run's sampler (with ``--gamma`` / ``--grid`` applied).
        args: ``fewstep eval`` arguments (``nfe``, ``n``, ``seed``).

    Returns:
        The ``fewstep eval`` record fields: student, teacher_euler, teacher_adaptive, floor, bars, n, reference.
    """
    name = run.config.data.name
    n = int(args.n or FLOOR_N[name])
    x1, cond = eval_noise(n, student.net.event_shape, student.net.num_classes, args.seed)
    p = next(student.parameters())

    def metrics(x: torch.Tensor) -> dict[str, float]:
        x = x.detach().float().cpu()
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("samples contain NaN or inf (a diverged run)")
        return image_metrics(name, x, cond, seed=args.seed)

    res = {}
    for k in args.nfe:
        with torch.no_grad():
            x = sample_with(student, x1.to(p.device, p.dtype), spec, int(k), seed=args.seed,
                            cond=None if cond is None else cond.to(p.device)).x
        res[str(k)] = {**metrics(x), "nfe": float(k)}
    euler, adaptive = {}, {}
    teacher = getattr(run.teacher, "inner", run.teacher)  # unguided: the bars are the teacher's w = 1 solves
    missing = ""
    if teacher is None and run.config.teacher.kind == "run" and run.config.teacher.path:
        # a method trained from data (imm, ct) still names the teacher whose bars it is judged by
        from fewstep.config.build import build_teacher

        try:
            teacher = build_teacher(run.config.teacher, p.device)
        except (OSError, ValueError) as e:  # the student is still scored; only the teacher rows are left out
            missing = f"; no teacher rows ({e})"
    if teacher is not None:
        tp = next(teacher.parameters(), p)
        z, c = x1.to(tp.device, tp.dtype), None if cond is None else cond.to(tp.device)
        steps = sorted({int(k) for k in args.nfe} | {BAR_FACTOR * int(k) for k in args.nfe})
        rows, adaptive, nfe = teacher_solves(teacher, z, c, steps, metrics)
        euler = {str(k): {**m, "nfe": float(k)} for k, m in rows.items()}
        adaptive["nfe"] = float(nfe)
    floor = real_floor(name, n)
    reference = (f"{n} real {name} images (seed {args.seed}), classifier features; noise seed {args.seed}"
                 + (", balanced labels i mod K" if cond is not None else "") + "; teacher unguided (w = 1)" + missing)
    return {"student": res, "teacher_euler": euler, "teacher_adaptive": adaptive, "floor": floor,
            "bars": image_bars(res, euler), "n": n, "reference": reference}
