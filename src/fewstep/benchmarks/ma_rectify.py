r"""2-rectified flow for the MA experiments: reflow on the pairs of a round-1 reflow student, MA scored by the
original teacher.

Round 1 is plain reflow of the analytic teacher (:math:`\lambda = 0`, ``steps`` steps, the seed of the arm), i.e.
the ``reflow`` arm of :mod:`fewstep.benchmarks.ma_experiments` with a longer budget. Round 2 (method key ``reflow2``)
regresses the FM-on-pairs loss on pairs :math:`(x_1, \Phi^{(1)}(x_1))` from the round-1 student's velocity ODE
(RK4-64, the same pair solver), starting from the round-1 weights (Liu et al. 2023 initialise the (k+1)-rectified
flow from the k-rectified one); its MA term aligns to the *original* teacher's score
(``method.set_score_teacher``), since a rectified field's velocity-to-score conversion is not a score
(:mod:`fewstep.methods.reflow`). So in round 2 MA can correct the errors of the round-1 pairs, which plain reflow
copies.

Through the CLI, round 2 is ``configs/reflow2_ma.yaml``: ``teacher: {kind: run, path: <round-1 run>}``,
``student.init_from: <round-1 run>``, ``score_teacher: {kind: preset, name: ring8}``. Here :func:`second_round` does
the same in-process on the built trainer, from the cached round-1 student; the CLI run's EMA student equals the
sweep's bitwise (docs/results/ma_perflow_highdim.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.ma_arms import Arm, Budget, arm_overrides, cli_line, train_arm
from fewstep.core.utils import set_unregistered
from fewstep.teachers.module import ModuleTeacher

__all__ = ["ROUND1", "round_one", "second_round", "round_two_note"]

ROUND1 = "round1"  # arm name of the round-1 students in the sweep JSON


def round_one(
    preset: str, seed: int, budget: Budget, steps: int, pair_dir: Path, cache: Path
) -> tuple[Any, dict[str, Any] | None]:
    """The round-1 student of (preset, seed): plain reflow for ``steps`` steps on the analytic teacher's pairs.

    Args:
        preset: Teacher preset (or mixture JSON).
        seed: Run seed.
        budget: Shared budget (width, depth, batch, pairs; ``steps`` replaces its step count).
        steps: Round-1 training steps.
        pair_dir: Pair cache of the analytic teacher.
        cache: Folder of cached round-1 students.

    Returns:
        (float32 EMA student, to be measured on a copy; run record with ``cli``, ``steps``, timings and
        ``student_file``, or None when it was loaded from the cache).
    """
    from fewstep.benchmarks.ma_eval import load_student

    arm = Arm(ROUND1, 0.0, 0, steps)
    ov = arm_overrides(preset, arm, seed, budget, {}, "reflow")
    path = cache / f"{Path(preset).stem}__{ROUND1}_{steps}__{seed}.pt"
    rec = {"steps": steps, "lam": 0.0, "warmup": 0, "student_file": str(path)}
    rec["cli"] = cli_line("reflow", ov, f"runs/ma/{Path(preset).stem}/{ROUND1}/{seed}")
    if path.is_file():
        return load_student(rec)[0].float(), None
    student, _, timing = train_arm("reflow", ov, pair_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": student.state_dict()}, path)
    return student.float(), {**rec, **timing}


def second_round(round1: Any) -> Callable[[Any], None]:
    """A ``train_arm`` setup hook making the built reflow run round 2 of ``round1``: pairs from its velocity ODE,
    student initialised from its weights, MA target the run's original (analytic) teacher.

    Args:
        round1: The round-1 velocity student (float32).

    Returns:
        ``setup(trainer)``.
    """

    def setup(tr: Any) -> None:
        m = tr.method
        m.set_score_teacher(m.teacher)
        pair_teacher = ModuleTeacher.from_flowmap(copy.deepcopy(round1)).eval().requires_grad_(False)
        set_unregistered(m, "teacher", pair_teacher)
        m.student.load_state_dict(round1.state_dict())

    return setup


def round_two_note(round1_file: str) -> str:
    """What a round-2 record's ``cli`` line does not say (appended to it)."""
    return (
        f" # round 2: pairs from the round-1 student {round1_file} (RK4-64), student initialised from it, MA scored "
        "by the teacher preset; as a CLI run add teacher.kind=run teacher.path=<round-1 run> "
        "student.init_from=<round-1 run> score_teacher.name=<preset> data.name=<preset> (configs/reflow2_ma.yaml)"
    )
