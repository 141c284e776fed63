r"""Pixel statistics and FD of an image student's x0-predictions along its own K-step grid.

A few-step student sampled deterministically (gamma 0) on the uniform grid :math:`1 = t_0 > \dots > t_K = 0` passes
through :math:`x_{t_i}`; its x0-prediction there, :math:`f_{t_i \to 0}(x_{t_i})`, is at :math:`t_0 = 1` the 1-NFE
sample and at :math:`t_{K-1}` the K-NFE sample. For a distribution-matching student (DMD2, decoupled DMD, CDM)
these are its backward-simulation anchors. Each row gives the pixel std, mean and max|x| of the prediction, against
the real images (values in [-1, 1]), and FD / precision / recall / class accuracy
(:func:`fewstep.evaluation.image_features.image_metrics`, as ``image_bench students``: EMA weights, evaluation
noise and balanced labels of :func:`fewstep.benchmarks.image_bench.eval_noise`).

``python -m fewstep.benchmarks.image_anchor_stats RUN [RUN ...] [--steps 4] [--n 898] [--seed 0] [--out FILE.md]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.benchmarks.image_bench import eval_noise
from fewstep.config.build import load_run
from fewstep.data.images import real_images
from fewstep.evaluation.image_features import FLOOR_N, image_metrics
from fewstep.sampling.samplers import time_grid

__all__ = ["pixel_stats", "anchor_rows", "markdown", "main"]


def pixel_stats(x: Tensor) -> dict[str, float]:
    """Pixel std, mean and max|x| of a batch of images."""
    x = x.double()
    return {"std": float(x.std()), "mean": float(x.mean()), "max_abs": float(x.abs().max())}


@torch.no_grad()
def anchor_rows(run_dir: str | Path, steps: int = 4, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One row per grid time t_0..t_{K-1} of the uniform ``steps``-step grid: stats of f_{t_i->0}(x_{t_i})."""
    run = load_run(run_dir)
    name = run.config.data.name
    student = run.student(ema=True)
    n = int(n or FLOOR_N[name])
    x, cond = eval_noise(n, student.net.event_shape, student.net.num_classes, seed)
    grid = time_grid(steps, kind="uniform").tolist()
    rows = []
    for i in range(steps):
        t = torch.full((n,), float(grid[i]))
        x0 = student(x, t, torch.zeros_like(t), cond=cond)
        rows.append({"run": str(run_dir), "t": float(grid[i]), **pixel_stats(x0),
                     **image_metrics(name, x0, cond, seed=seed)})
        x = student(x, t, torch.full_like(t, float(grid[i + 1])), cond=cond)
    return rows


def markdown(rows: list[dict[str, Any]], real: dict[str, float]) -> str:
    """The rows as a markdown table, the real images first."""
    lines = ["| run | anchor t | std | mean | max abs | FD | precision | recall | class acc |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| real images | - | {real['std']:.3f} | {real['mean']:.3f} | {real['max_abs']:.2f} | | | | |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['t']:.2f} | {r['std']:.3f} | {r['mean']:.3f} | {r['max_abs']:.2f} | "
                     f"{r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_acc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print (and with ``--out`` write) the table for each run."""
    p = argparse.ArgumentParser(prog="python -m fewstep.benchmarks.image_anchor_stats")
    p.add_argument("runs", nargs="+")
    p.add_argument("--steps", type=int, default=4, help="K of the uniform grid (default 4)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = [r for run in a.runs for r in anchor_rows(run, a.steps, a.n, a.seed)]
    text = markdown(rows, pixel_stats(real_images(load_run(a.runs[0]).config.data.name, "all")[0]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
