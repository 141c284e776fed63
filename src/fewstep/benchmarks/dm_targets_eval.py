"""``fewstep eval --target``: a class-conditional student against one target of :mod:`fewstep.benchmarks.dm_targets`.

The targets (guided ODE, tilted density, w = 1 mixture) are drawn by
:func:`fewstep.benchmarks.dm_targets.target_samples` with the same labels and noise as the benchmark; the tilted
sampler's grid is sized by :func:`auto_box`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fewstep.benchmarks.dm_targets import score_targets, target_samples
from fewstep.benchmarks.dm_targets_report import TARGETS
from fewstep.evaluation.metrics import mmd2

__all__ = ["run_guidance", "auto_box", "eval_target"]


def run_guidance(config: Any) -> float:
    """The CFG weight w of a run: ``teacher.guidance`` if it is not 1, else the method's ``guidance`` (default 1).

    Args:
        config: The run's :class:`~fewstep.config.schema.RunConfig`.

    Returns:
        The guidance weight w.
    """
    w = float(config.teacher.guidance)
    return w if w != 1.0 else float(dict(config.method.cfg).get("guidance", 1.0))


def auto_box(teacher: Any) -> float:
    """Half-width of the tilted sampler's grid: the largest mean coordinate plus 8 of the widest std.

    Args:
        teacher: A 2-D Gaussian-mixture teacher.

    Returns:
        The half-width of the square grid.
    """
    return float(teacher.means.abs().max() + 8.0 * teacher.eigvals.max().sqrt())


def eval_target(
    student: Any, teacher: Any, target: str, w: float, nfe: list[int], n: int, seed: int, sample: Any
) -> dict[str, Any]:
    """``fewstep eval --target``: a class-conditional student against one target at guidance w (same labels).

    Args:
        student: The flow-map student.
        teacher: The run's class-conditional 2-D mixture.
        target: One of :data:`TARGETS`.
        w: Guidance weight defining the target.
        nfe: Step counts of the student.
        n: Samples per draw.
        seed: Seed of the labels, noise and target draws.
        sample: ``sample(k, z, cond)`` returning the student's k-step samples (the run's own sampler).

    Returns:
        The sections of ``eval.json``: per-NFE student metrics (``mmd2`` to the target plus ``mmd2_<target>`` to
        all three), the guided teacher's Euler and adaptive rows, and the target's floor (three independent
        draws; mean and sd).

    Raises:
        ValueError: for an unknown target or a teacher that is not a class-conditional 2-D mixture.
    """
    from fewstep.sampling.samplers import solve, solve_adaptive

    if target not in TARGETS:
        raise ValueError(f"--target must be one of {TARGETS}; got {target!r}")
    if getattr(teacher, "num_classes", None) is None or getattr(teacher, "dim", None) != 2:
        raise ValueError(
            "--target needs a class-conditional 2-D analytic teacher (the tilted density is sampled on "
            "a grid); this run's teacher is not one"
        )
    box = auto_box(teacher)
    cache: dict[Any, Tensor] = {}
    tg = target_samples(teacher, w, n, seed, box, box / 450, cache)

    def row(x: Tensor, nfe_k: float) -> dict[str, float]:
        all3 = score_targets(x, tg)
        return {"mmd2": all3[target], **{f"mmd2_{t}": v for t, v in all3.items()}, "nfe": nfe_k}

    z, cond = tg["z"], tg["cond"]
    student_rows = {k: row(sample(int(k), z, cond), float(k)) for k in nfe}
    kw = {"guidance": w} if w != 1.0 else {}
    euler = {k: row(solve(teacher, z, int(k), cond=cond, **kw).x, float(k)) for k in nfe}
    ode = solve_adaptive(teacher, z, cond=cond, rtol=1e-6, atol=1e-6, **kw)
    adaptive = row(ode.x, float(ode.nfe))
    floors = [mmd2(tg[target], tg[target + "_2"])]
    for s in (1, 2):
        extra = target_samples(teacher, w, n, seed + 1000 * s, box, box / 450, cache)
        floors.append(mmd2(extra[target], extra[target + "_2"]))
    mean = sum(floors) / len(floors)
    sd = (sum((f - mean) ** 2 for f in floors) / (len(floors) - 1)) ** 0.5
    return {
        "student": student_rows,
        "teacher_euler": euler,
        "teacher_adaptive": adaptive,
        "floor_exact_vs_exact": {"mmd2": mean, "mmd2_sd": sd},
        "reference": f"target {target} at w={w:g} (fewstep.benchmarks.dm_targets), samples use its labels",
    }
