"""The leaderboard grid: one cell at a time, each cached as JSON under the run folder, so a rerun resumes.

Layout of ``<run_dir>/<budget tag>/``: ``cells/<method>__<target>__s<seed>.json`` (one finished cell, written
atomically), ``bars/<target>__s<seed>.json`` (the teacher's Euler curve), ``requests/*.json`` (the command and
grid of every invocation, so the report can name the cells still missing). A cell that is already cached is never
recomputed; a failed cell is cached as failed (``retry_failed`` runs it again).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.cells import CONFIG_DIR, Budget, run_cell
from fewstep.benchmarks.leaderboard.targets import teacher_curve

__all__ = ["cell_path", "read_json", "write_json", "run_grid", "budget_dir"]


def budget_dir(run_dir: str | Path, budget: Budget) -> Path:
    """``<run_dir>/<budget.tag()>``: every cell of one budget."""
    return Path(run_dir) / budget.tag()


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "_")


def cell_path(root: Path, method: str, target: str, seed: int) -> Path:
    """Cache file of one cell under a budget folder."""
    return root / "cells" / f"{method}__{_safe(target)}__s{seed}.json"


def read_json(path: Path) -> Any:
    """A cached JSON file, or None when it is missing or unreadable (a cell cut off mid-write is redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


def _progress(total: int, quiet: bool) -> Any:
    """A tqdm bar on stderr when tqdm is installed, else None (one line per cell is printed instead)."""
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="bench cells", unit="cell", dynamic_ncols=True, file=sys.stderr)


def run_grid(
    methods: list[str],
    targets: list[str],
    seeds: list[int],
    budget: Budget,
    run_dir: str | Path,
    command: str,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    config_dir: Path = CONFIG_DIR,
    quiet: bool = False,
    cell_fn: Callable[..., dict[str, Any]] = run_cell,
) -> dict[str, int]:
    """Run every missing cell of methods x targets x seeds (target-major, so a partial run covers all methods).

    Args:
        methods: Registered method names.
        targets: Expanded target names.
        seeds: Seeds.
        budget: The common budget.
        run_dir: Run folder (cells under ``<run_dir>/<budget tag>``).
        command: The command line, recorded for the report.
        shard: (i, n): run only cells whose index in the grid is i mod n (parallel processes share the cache).
        retry_failed: Run cells cached as failed again.
        config_dir: Folder of the shipped configs.
        quiet: No progress bar or per-cell lines.
        cell_fn: The cell runner (:func:`~fewstep.benchmarks.leaderboard.cells.run_cell`).

    Returns:
        Counts: ``ran``, ``cached``, ``failed`` (of this invocation's share of the grid).
    """
    root = budget_dir(run_dir, budget)
    grid = [(m, t, s) for t in targets for s in seeds for m in methods]
    write_json(
        root / "requests" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.json",
        {"command": command, "budget": budget.to_dict(), "grid": grid},
    )
    mine = [c for i, c in enumerate(grid) if i % shard[1] == shard[0]]
    counts = {"ran": 0, "cached": 0, "failed": 0}
    bar = _progress(len(mine), quiet)
    for method, target, seed in mine:
        path = cell_path(root, method, target, seed)
        old = read_json(path)
        if old is not None and (old.get("status") == "ok" or not retry_failed):
            counts["cached"] += 1
        else:
            bars = teacher_curve(target, seed, budget.n, root / "bars")
            t0 = time.perf_counter()
            rec = cell_fn(method, target, seed, budget, bars, config_dir)
            rec["cell_wall_s"] = time.perf_counter() - t0
            write_json(path, rec)
            counts["ran"] += 1
            counts["failed"] += rec.get("status") != "ok"
            if bar is None and not quiet:
                fin = rec.get("final") or {}
                print(
                    f"{method:>14s} {target:>10s} s{seed}: {rec.get('status')} "
                    + " ".join(f"{k}-NFE {v['mmd2']:.4f}" for k, v in fin.items())
                    + f" ({rec['cell_wall_s']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        if bar is not None:
            bar.set_postfix_str(f"{method} {target} s{seed}")
            bar.update(1)
    if bar is not None:
        bar.close()
    for target in targets:  # bars of every target, also when all its cells were cached by another shard
        for seed in seeds:
            teacher_curve(target, seed, budget.n, root / "bars")
    return counts
