r"""Image benchmark: a learned image teacher's quality table, its students' FD at 1/2/4 NFE, sample grids and
training step cost per backbone and method.

Every sample set uses the same evaluation noise :math:`x_1 \sim N(0, I)` (generator seed ``seed``) and balanced
labels :math:`c_i = i \bmod K`; metrics are :func:`fewstep.evaluation.image_features.image_metrics` (FD,
improved precision/recall, class accuracy) against ``n`` real images, next to the real-vs-real floor.

Commands (``python -m fewstep.benchmarks.image_bench ...``)::

    teacher RUN --out docs/results/images_teacher.md [--n 898] [--guidance 1] [--steps 1 2 4 8 16]
    students RUN [RUN ...] --out FILE.md [--nfe 1 2 4] [--gamma G] [--grid uniform|edm|1,0.3,0]
    grid RUN [RUN ...] --out grid.png [--nfe 1 2 4]        one row per class, one column per (run, NFE)
    timing --teacher TEACHER_RUN --configs A.yaml B.yaml ... [--steps 5]   median step time per config
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.cli_eval_images import teacher_solves
from fewstep.config.build import build_teacher, load_run
from fewstep.config.schema import TeacherConfig
from fewstep.evaluation.image_features import FLOOR_N, eval_noise, fd_floor, image_metrics
from fewstep.sampling.image_grid import image_mosaic, save_grid
from fewstep.sampling.samplers import solve
from fewstep.sampling.spec import sample_with

__all__ = ["eval_noise", "run_data_name", "teacher_rows", "student_rows", "image_mosaic", "save_grid", "step_times",
           "main"]


def run_data_name(run_dir: str | Path) -> str:
    """The data name (e.g. ``digits8``) in the run config of ``run_dir``."""
    from fewstep.config.run_folder import read_run_config

    return read_run_config(run_dir).data.name


def teacher_rows(run_dir: str | Path, n: int | None = None, seed: int = 0, steps: Sequence[int] = (1, 2, 4, 8, 16),
                 guidance: float = 1.0, rtol: float = 1e-4, split: str = "all") -> list[dict[str, Any]]:
    """Metrics of a flow-matching run used as teacher: Euler with each step count and adaptive dopri5."""
    name = run_data_name(run_dir)
    teacher = build_teacher(TeacherConfig(kind="run", path=str(run_dir)))
    n = int(n or FLOOR_N[name])
    x1, cond = eval_noise(n, teacher.event_shape, teacher.num_classes, seed)
    euler, adaptive, nfe = teacher_solves(teacher, x1, cond, steps,
                                          lambda x: image_metrics(name, x, cond, seed=seed, split=split),
                                          guidance, rtol)
    rows = [{"sampler": f"Euler {k}", "nfe": k, **m} for k, m in euler.items()]
    return [*rows, {"sampler": f"dopri5 (rtol {rtol:g})", "nfe": nfe, **adaptive}]


def student_rows(run_dir: str | Path, nfe: Sequence[int] = (1, 2, 4), n: int | None = None,
                 seed: int = 0, split: str = "all", gamma: float | None = None,
                 grid: str | None = None) -> list[dict[str, Any]]:
    """Metrics of a distilled run's EMA student with its own sampler at each NFE.

    ``gamma`` / ``grid`` override the run's sampler as ``fewstep sample --gamma/--grid`` do; explicit grid times
    (e.g. ``"1,0.3,0"``) replace ``nfe`` (one row, NFE = number of jumps). The row name records the override.
    """
    from fewstep.cli_eval import run_sampler

    run = load_run(run_dir)
    name = run.config.data.name
    student = run.student(ema=True)
    spec, times = run_sampler(run, gamma, grid)
    n = int(n or FLOOR_N[name])
    x1, cond = eval_noise(n, student.net.event_shape, student.net.num_classes, seed)
    tag = "".join([f" gamma={gamma:g}" if gamma is not None else "", f" grid={grid}" if grid else ""])
    rows = []
    for k in ([len(times) - 1] if times else nfe):
        x = sample_with(student, x1, spec, nfe=int(k), grid=times, cond=cond, seed=seed).x
        rows.append({"sampler": f"{run.config.method.name}{tag} {k}", "nfe": int(k), "steps": run.step,
                     **image_metrics(name, x, cond, seed=seed, split=split)})
    return rows


def markdown(rows: list[dict[str, Any]], floor: dict[str, float] | None = None) -> str:
    """Rows as a markdown table (FD, precision, recall, class accuracy), with the real-vs-real floor last."""
    lines = ["| sampler | NFE | FD | precision | recall | class acc |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['nfe']} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r.get('class_acc', float('nan')):.3f} |")
    if floor:
        lines.append(f"| real vs real (floor) | - | {floor['fd']:.2f} | {floor['precision']:.3f} | "
                     f"{floor['recall']:.3f} | - |")
    return "\n".join(lines) + "\n"


def step_times(config: str | Path, overrides: Sequence[str] = (), steps: int = 5) -> dict[str, float]:
    """Median wall time of ``steps`` training iterations (after one warm-up) of a run config, one thread."""
    from fewstep.config.build import build_run
    from fewstep.config.schema import load_config

    cfg = load_config(config, list(overrides))
    trainer = build_run(cfg, device="cpu", run_dir=None, with_eval=False)
    trainer.prepare()
    times = []
    for k in range(steps + 1):
        t0 = time.perf_counter()
        trainer.train_step(k)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times[1:]), "min_s": min(times[1:]), "batch": cfg.train.batch_size}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fewstep.benchmarks.image_bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("run")
    t.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    t.add_argument("--guidance", type=float, default=1.0)
    s = sub.add_parser("students")
    s.add_argument("runs", nargs="+")
    s.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    s.add_argument("--gamma", type=float, default=None, help="sampler gamma override (default: the run's)")
    s.add_argument("--grid", default=None, help="grid rule (uniform, edm) or explicit times like 1,0.3,0")
    g = sub.add_parser("grid")
    g.add_argument("runs", nargs="+")
    g.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--teacher-steps", type=int, nargs="*", default=[4, 16])
    m = sub.add_parser("timing")
    m.add_argument("configs", nargs="+")
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--set", nargs="*", default=[], help="overrides applied to every config")
    for q in (t, s):
        q.add_argument("--split", default="all", choices=["all", "test"], help="reference images (test = held out)")
    for q in (t, s, g, m):
        q.add_argument("--out", required=True)
        q.add_argument("--n", type=int, default=None)
        q.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.cmd == "teacher":
        rows = teacher_rows(a.run, a.n, a.seed, a.steps, a.guidance, split=a.split)
        name = run_data_name(a.run)
        text = markdown(rows, fd_floor(name, a.n or FLOOR_N[name], split=a.split))
    elif a.cmd == "students":
        rows = [r for run in a.runs for r in student_rows(run, a.nfe, a.n, a.seed, a.split, a.gamma, a.grid)]
        text = markdown(rows)
    elif a.cmd == "grid":
        cols: dict[str, Tensor] = {}
        for run_dir in a.runs:
            run = load_run(run_dir)
            st = run.student(ema=True)
            x1, cond = eval_noise(20, st.net.event_shape, st.net.num_classes, a.seed)
            if run.config.method.name == "flow_matching":
                for k in a.teacher_steps:
                    with torch.no_grad():
                        cols[f"teacher Euler {k}"] = solve(st.velocity, x1, k, method="euler", cond=cond).x
                continue
            for k in a.nfe:
                cols[f"{run.config.method.name} {k}"] = sample_with(st, x1, run.sampler, nfe=k, cond=cond,
                                                                    seed=a.seed).x
        print(f"wrote {save_grid(cols, out)}")
        return 0
    else:
        rows = [{"config": c, **step_times(c, a.set, a.steps)} for c in a.configs]
        text = "| config | batch | median step (s) | min (s) |\n|---|---|---|---|\n" + "".join(
            f"| {r['config']} | {r['batch']} | {r['median_s']:.3f} | {r['min_s']:.3f} |\n" for r in rows)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
