"""The student init of a bench cell whose method declares one (``Method.needs_init``, e.g. the DM family).

Such a cell first needs a run folder of the init method (``flow_matching``) trained on the same target, seed and
budget (steps, batch, student width and depth: the init method's own bench cell config,
:func:`~fewstep.benchmarks.leaderboard.cell_setup.cell_config`); the cell then loads it with
``student.init_from=<folder>``, as every documented DM number does. The folder is cached under
``$FEWSTEP_BENCH_INIT`` (default ``runs/bench-init``) as ``<budget tag>/<method>/<target>-s<seed>``, trained by
:func:`~fewstep.benchmarks.leaderboard.cached_run.train_run_folder` (the folder appears only once complete), and is
reused when its manifest ``bench_init.json`` (written last: training seconds and evaluation counts) exists. The cell's
``prepare_s`` includes the init's training time, also when the init is cached.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.cached_run import train_run_folder
from fewstep.benchmarks.leaderboard.cell_setup import CONFIG_DIR, Budget, EvalCounter, cell_config
from fewstep.benchmarks.leaderboard.store import read_json, write_json
from fewstep.methods.registry import get_method

__all__ = ["INIT_ENV", "MANIFEST", "init_root", "init_folder", "ensure_init", "cell_init", "init_cost"]

INIT_ENV = "FEWSTEP_BENCH_INIT"
MANIFEST = "bench_init.json"


def init_root() -> Path:
    """``$FEWSTEP_BENCH_INIT``, else ``runs/bench-init`` (relative to the working directory).

    Returns:
        The root folder of the cached init runs.
    """
    return Path(os.environ.get(INIT_ENV) or "runs/bench-init")


def init_folder(method: str, target: str, seed: int, budget: Budget, root: Path | None = None) -> Path:
    """The cached run folder of ``method`` trained as the init of a cell.

    Args:
        method: The init method (e.g. ``flow_matching``).
        target: Target name (``:`` becomes ``-`` in the folder name).
        seed: Cell seed.
        budget: The common budget.
        root: Cache root; default :func:`init_root`.

    Returns:
        ``<root>/<budget tag>/<method>/<target>-s<seed>``.
    """
    return Path(root or init_root()) / budget.tag() / method / f"{target.replace(':', '-')}-s{seed}"


def ensure_init(
    method: str, target: str, seed: int, budget: Budget, config_dir: Path = CONFIG_DIR, root: Path | None = None
) -> dict[str, Any]:
    """Train ``method``'s bench cell config into its init folder unless a complete one is cached.

    Args:
        method: The init method.
        target: Target name.
        seed: Cell seed (the init's training seed).
        budget: The common budget (the init trains ``budget.steps`` steps of ``budget.batch_size``).
        config_dir: Folder of the shipped configs.
        root: Cache root; default :func:`init_root`.

    Returns:
        The manifest: ``method``, ``steps``, ``train_s``, ``net_evals``, ``teacher_evals``, ``folder``, plus
        ``cached`` (True when nothing was trained now).
    """
    folder = init_folder(method, target, seed, budget, root)
    manifest = read_json(folder / MANIFEST)
    if manifest is not None:
        return {**manifest, "folder": str(folder), "cached": True}
    if folder.exists():  # a folder without its manifest (written after the folder is complete): train it again
        shutil.rmtree(folder)
    counters: list[EvalCounter] = []

    def count(trainer: Any) -> Callable[[], None]:
        counters.append(EvalCounter(trainer.method, getattr(trainer.method, "teacher", None)))
        return counters[-1].close

    train_s = train_run_folder(cell_config(method, target, seed, budget, config_dir), folder, on_trainer=count)
    rec = {
        "method": method,
        "steps": budget.steps,
        "train_s": train_s,
        "net_evals": counters[0].net_rows,
        "teacher_evals": counters[0].teacher_rows,
    }
    write_json(folder / MANIFEST, rec)
    return {**rec, "folder": str(folder), "cached": False}


def cell_init(method: str, target: str, seed: int, budget: Budget, config_dir: Path = CONFIG_DIR) -> dict | None:
    """The init of a cell of ``method`` (:func:`ensure_init` of its ``needs_init``), or None if it needs none.

    Args:
        method: The cell's method.
        target: Target name.
        seed: Cell seed.
        budget: The common budget.
        config_dir: Folder of the shipped configs.

    Returns:
        The init manifest (see :func:`ensure_init`) or None.
    """
    need = get_method(method).needs_init
    return None if need is None else ensure_init(need, target, seed, budget, config_dir)


def init_cost(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The init's share of the training cost of a method's cells (medians over the cells that record an init).

    The init trains ``steps`` steps of the cell's batch (``budget.batch_size``), so its evaluations per training
    sample and step are its evaluated rows over ``steps × batch_size``.

    Args:
        cells: Cell records of one method (``init`` as :func:`cell_init` returns it, ``budget`` as stored).

    Returns:
        None when no cell has an init; else ``method``, ``cells`` (how many have one), medians of ``steps``,
        ``net_evals_per_sample``, ``teacher_evals_per_sample``, ``net_evals``, ``teacher_evals`` (totals) and
        ``train_s``.
    """
    got = [c for c in cells if c.get("init")]
    if not got:
        return None

    def med(key: str, per_row: bool = False) -> float | None:
        vals = [
            c["init"][key] / max(1, c["init"]["steps"] * c["budget"]["batch_size"]) if per_row else c["init"][key]
            for c in got
            if not per_row or "batch_size" in c.get("budget", {})
        ]
        return statistics.median(vals) if vals else None

    return {
        "method": got[0]["init"]["method"],
        "cells": len(got),
        **{k: med(k) for k in ("steps", "net_evals", "teacher_evals", "train_s")},
        "net_evals_per_sample": med("net_evals", per_row=True),
        "teacher_evals_per_sample": med("teacher_evals", per_row=True),
    }
