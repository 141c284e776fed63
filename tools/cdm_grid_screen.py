"""Sampling-grid screen of one method's bench cell: train the cell once per target, sample its EMA student along
fixed grids (deterministic jumps), print the MMD² per grid and the teacher's Euler MMD² curve (the bars) as JSON.

Used for cdm's 2-NFE middle time (docs/results/method_studies.md, section 2):

    python tools/cdm_grid_screen.py aniso3 random:100 random:101                       # tuning targets
    python tools/cdm_grid_screen.py random:0 random:1 --grids "1,0" "1,.25,0" "1,.5,0" \\
        "1,.5625,.25,.0625,0" "1,.75,.5,.25,0"                                          # judged targets

The cell is the bench's s2000 cell (2000 steps x 512, MLP 256x4, n 2000, seed 0) with one probe; its t = 0.5 numbers
reproduce the stored cells (four probes) because the probes do not touch the training RNG.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from fewstep.benchmarks.leaderboard.cell_setup import Budget, cell_config
from fewstep.benchmarks.leaderboard.init import cell_init
from fewstep.benchmarks.leaderboard.targets import load_target, sample_metrics, target_reference, teacher_curve
from fewstep.config.build import build_run
from fewstep.evaluation.evaluate import noise

DEFAULT_GRIDS = ["1,0", "1,.25,0", "1,.3,0", "1,.4,0", "1,.5,0", "1,.6,0", "1,.7,0", "1,.75,.5,.25,0"]


def train_cell(method: str, target: str, overrides: tuple[str, ...] = (), seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """Train the s2000 bench cell (one probe) with ``overrides``.

    Returns (trainer, EMA student, the cell's evaluation noise, the reference samples).
    """
    b = Budget(steps=2000, batch_size=512, hidden=256, depth=4, n=2000, probes=1)
    init = cell_init(method, target, seed, b)
    extra = (() if init is None else (f"student.init_from={init['folder']}",)) + tuple(overrides)
    tr = build_run(cell_config(method, target, seed, b, extra=extra), device="cpu", run_dir=None, with_eval=False)
    tr.prepare()
    tr.fit()
    tgt = load_target(target)
    return tr, tr.student(ema=True).eval(), noise(b.n, tgt, seed).float(), target_reference(target, tgt, b.n, seed)


def grid_mmd2(f: Any, x1: torch.Tensor, ref: Any, grid: tuple[float, ...]) -> float:
    """MMD² to ``ref`` of the flow map ``f``'s deterministic jumps from ``x1`` along ``grid`` (no gradient)."""
    x = x1
    with torch.no_grad():
        for t, s in zip(grid[:-1], grid[1:]):
            x = f(x, torch.full((x1.shape[0],), float(t)), torch.full((x1.shape[0],), float(s)))
    return sample_metrics(x, ref)["mmd2"]


def screen(method: str, target: str, grids: list[tuple[float, ...]], seed: int = 0) -> dict:
    """MMD² of the trained cell's EMA student along each grid, the Euler bars and the wall time."""
    t0 = time.time()
    _, f, x1, ref = train_cell(method, target, seed=seed)
    res: dict = {str(g): grid_mmd2(f, x1, ref, g) for g in grids}
    res["bars"] = {k: v["mmd2"] for k, v in teacher_curve(target, seed, x1.shape[0])["euler"].items()}
    res["time_s"] = time.time() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--method", default="cdm")
    ap.add_argument("--grids", nargs="+", default=DEFAULT_GRIDS, help="comma-separated decreasing times ending at 0")
    a = ap.parse_args()
    torch.set_num_threads(1)
    grids = [tuple(float(v) for v in g.split(",")) for g in a.grids]
    for target in a.targets:
        print(target, json.dumps(screen(a.method, target, grids)), flush=True)


if __name__ == "__main__":
    main()
