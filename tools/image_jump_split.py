"""Which jump of a 2-NFE image student loses FD? Swap one jump for the teacher's fine Euler solve.

For a run's EMA student (deterministic jumps) and its teacher, from image_bench's evaluation noise (seed, balanced
labels), with middle time m (the 2-NFE grid is 1 -> m -> 0):

- ``SS``: student 1 -> m, student m -> 0 (the student's 2-NFE sample; equals ``image_bench students`` at gamma 0);
- ``ST``: student 1 -> m, teacher Euler ``--k`` steps m -> 0 (the first jump's loss, given an exact second half);
- ``TS``: teacher Euler ``--k`` steps 1 -> m, student m -> 0 (the second jump's loss, from the teacher's x_m);
- ``TT``: teacher Euler 2 ``--k`` steps 1 -> 0 (the reference these are compared with).

Prints one markdown row per run: FD (digits8 classifier features, image_bench's protocol) of the four samplers.

``python tools/image_jump_split.py RUN [RUN ...] [--mid 0.5] [--k 16] [--seed 0]``
"""

from __future__ import annotations

import argparse

import torch

from fewstep.config.build import build_teacher, load_run
from fewstep.evaluation.image_features import FLOOR_N, eval_noise, image_metrics
from fewstep.sampling.samplers import sample_flowmap, solve


def main() -> None:
    """Print the four FDs of each run."""
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--mid", type=float, default=0.5)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    m, k = a.mid, a.k
    print("| run | SS (student, student) | ST (student, teacher) | TS (teacher, student) "
          f"| TT (teacher Euler {2 * k}) |")
    print("|---|---|---|---|---|")
    for run_dir in a.runs:
        run = load_run(run_dir)
        name = run.config.data.name
        student = run.student(ema=True)
        vel = build_teacher(run.config.teacher).velocity
        x1, cond = eval_noise(FLOOR_N[name], student.net.event_shape, student.net.num_classes, a.seed)

        def fd(x: torch.Tensor) -> float:
            return float(image_metrics(name, x, cond, seed=a.seed, split="all")["fd"])

        with torch.no_grad():
            xs_m = sample_flowmap(student, x1, [1.0, m], cond=cond).x
            xt_m = solve(vel, x1, torch.linspace(1.0, m, k + 1).tolist(), cond=cond, guidance=1.0).x
            out = {
                "SS": fd(sample_flowmap(student, xs_m, [m, 0.0], cond=cond).x),
                "ST": fd(solve(vel, xs_m, torch.linspace(m, 0.0, k + 1).tolist(), cond=cond, guidance=1.0).x),
                "TS": fd(sample_flowmap(student, xt_m, [m, 0.0], cond=cond).x),
                "TT": fd(solve(vel, xt_m, torch.linspace(m, 0.0, k + 1).tolist(), cond=cond, guidance=1.0).x),
            }
        print(f"| {run_dir} | " + " | ".join(f"{out[c]:.2f}" for c in ("SS", "ST", "TS", "TT")) + " |", flush=True)


if __name__ == "__main__":
    main()
