r"""The arms of the MA experiments (:mod:`fewstep.benchmarks.ma_experiments`): budget, arm list, run overrides,
in-process training and the MA cost ratio r.

Every arm is a run config (:data:`fewstep.benchmarks.ma_eval.BASE_CONFIG` plus dotted overrides), trained exactly as
``fewstep distill --config <base> <overrides>`` would train it (:func:`fewstep.config.build.build_run`);
:func:`cli_line` prints that command.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.benchmarks.ma_eval import BASE_CONFIG, PAIR_METHODS, arm_config
from fewstep.benchmarks.ma_teacher_run import is_run_target, run_folder, run_overrides
from fewstep.config.build import build_run

__all__ = [
    "LAMBDAS",
    "MA_DEFAULT",
    "Arm",
    "Budget",
    "arms",
    "teacher_overrides",
    "arm_overrides",
    "cli_line",
    "train_arm",
    "calibrate",
]

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)
# MA in the ODE form of the current API: exact divergence of the student velocity along 4 Euler sub-steps of [t_min, 1]
MA_DEFAULT: dict[str, Any] = {
    "ma_mode": "exact",
    "ma_substeps": 4,
    "ma_solver": "euler",
    "ma_t_min": 0.05,
    "ma_batch": 64,
}


@dataclass
class Budget:
    """Training budget shared by every arm: N steps, batch, student MLP width x depth, number of pairs."""

    steps: int = 500
    batch: int = 256
    hidden: int = 64
    depth: int = 3
    n_pairs: int = 20000


@dataclass
class Arm:
    """One arm: name, MA weight, first MA step, training steps."""

    name: str
    lam: float
    warmup: int
    steps: int


def arms(budget: Budget, ratio: float, lambdas: tuple[float, ...] = LAMBDAS) -> list[Arm]:
    """The arms of the module docstring for cost ratio ``ratio`` (MA step / plain step), in the order they are
    trained (every seed of an arm before the next arm, so a cut-short sweep has whole arms)."""
    n = budget.steps
    return [
        Arm("base@N", 0.0, 0, n),
        *[Arm(f"MA {lam:g} start", lam, 0, n) for lam in lambdas],
        Arm("base@cpu", 0.0, 0, round(ratio * n)),
        *[Arm(f"MA {lam:g} mid", lam, n // 2, n) for lam in lambdas],
        Arm("base@cpu-mid", 0.0, 0, round((1 + ratio) / 2 * n)),
    ]


def teacher_overrides(preset: str) -> list[str]:
    """``teacher.*`` overrides naming a preset, a mixture JSON file or (``run:<folder>``) a learned teacher's run."""
    if is_run_target(preset):
        return run_overrides(run_folder(preset))
    if preset.endswith(".json"):
        return ["teacher.kind=json", f"teacher.path={preset}"]
    return ["teacher.kind=preset", f"teacher.name={preset}"]


def arm_overrides(
    preset: str, arm: Arm, seed: int, budget: Budget, ma: dict[str, Any], method: str = "reflow"
) -> list[str]:
    """The dotted overrides of one arm (applied to :data:`BASE_CONFIG`; ``n_pairs`` only for pair methods)."""
    ov = [
        f"seed={seed}",
        *teacher_overrides(preset),
        f"student.hidden={budget.hidden}",
        f"student.depth={budget.depth}",
        f"train.steps={arm.steps}",
        f"train.batch_size={budget.batch}",
        *([f"method.cfg.n_pairs={budget.n_pairs}"] if method in PAIR_METHODS else []),
        f"method.cfg.ma_weight={arm.lam:g}",
    ]
    if arm.lam > 0:
        ov += [f"method.cfg.ma_warmup={arm.warmup}"] + [f"method.cfg.{k}={v}" for k, v in ma.items()]
    return ov


def cli_line(method: str, overrides: list[str], run_dir: str) -> str:
    """The equivalent user command of an arm (``fewstep distill`` then ``fewstep eval``)."""
    return (
        f"fewstep distill --config {BASE_CONFIG[method]} {' '.join(overrides)} --run-dir {run_dir} && "
        f"fewstep eval {run_dir}"
    )


def train_arm(
    method: str, overrides: list[str], pair_dir: Path, setup: Callable[[Any], None] | None = None
) -> tuple[Any, Any, dict[str, float]]:
    """Train one arm in-process; returns (EMA student, method, timings: CPU and wall seconds per step).

    ``setup(trainer)`` runs after the run is built and before pairs, optimisers and EMA are prepared (2-rectified
    flow: :func:`fewstep.benchmarks.ma_rectify.second_round`).
    """
    cfg = arm_config(method, overrides, pair_dir)
    tr = build_run(cfg, run_dir=None, with_eval=False)
    if setup is not None:
        setup(tr)
    tr.prepare()  # pair generation is not counted
    c0, w0 = time.process_time(), time.perf_counter()
    tr.fit()
    steps = max(int(cfg.train.steps), 1)
    return (
        tr.student(ema=True),
        tr.method,
        {"cpu_s_per_step": (time.process_time() - c0) / steps, "wall_s_per_step": (time.perf_counter() - w0) / steps},
    )


def calibrate(
    method: str, preset: str, budget: Budget, ma: dict[str, Any], pair_dir: Path, steps: int = 30, repeats: int = 2
) -> float:
    """r = CPU time per MA step / CPU time per plain step (single thread; min over ``repeats`` alternations)."""
    best = {0.0: float("inf"), 1e-3: float("inf")}
    for _ in range(repeats):
        for lam in best:
            ov = arm_overrides(preset, Arm("cal", lam, 0, steps), 0, budget, ma, method)
            best[lam] = min(best[lam], train_arm(method, ov, pair_dir)[2]["cpu_s_per_step"])
    return best[1e-3] / best[0.0]
