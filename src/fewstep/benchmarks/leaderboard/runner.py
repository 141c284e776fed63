"""The leaderboard grid: one cell at a time, each finished cell written to the tracked store, so a rerun resumes.

Cells live in :mod:`~fewstep.benchmarks.leaderboard.store` (``<cells_dir>/<budget tag>/<target>/<method>/
seed<k>.json``, the metrics only, small enough to commit) and the teacher's Euler curves beside them. A complete
cell (:func:`~fewstep.benchmarks.leaderboard.store.is_complete`) is never recomputed; a failed cell is cached as
failed (``retry_failed`` runs it again); a cell with stale entries (computed with an older evaluation) is rerun and
its record replaced.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.cells import CONFIG_DIR, Budget, run_cell
from fewstep.benchmarks.leaderboard.store import (
    EVAL_VERSION,
    bars_dir,
    budget_root,
    cell_path,
    host_label,
    is_complete,
    read_json,
    write_json,
)
from fewstep.benchmarks.leaderboard.targets import teacher_curve
from fewstep.core.io import git_commit

__all__ = ["budget_dir", "run_grid", "grid_cells"]


def budget_dir(cells_dir: str | Path, budget: Budget) -> Path:
    """``<cells_dir>/<budget.tag()>``: every cell of one budget."""
    return budget_root(cells_dir, budget.tag())


def grid_cells(methods: list[str], targets: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """The grid in run order: target-major, then seed, then method (a partial run covers every method)."""
    return [(m, t, s) for t in targets for s in seeds for m in methods]


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
    cells_dir: str | Path,
    command: str,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    config_dir: Path = CONFIG_DIR,
    quiet: bool = False,
    cell_fn: Callable[..., dict[str, Any]] = run_cell,
) -> dict[str, int]:
    """Run every cell of methods x targets x seeds that the store does not hold complete.

    Args:
        methods: Registered method names.
        targets: Expanded target names.
        seeds: Seeds.
        budget: The common budget.
        cells_dir: The cell store (cells under ``<cells_dir>/<budget tag>``).
        command: The command line, recorded in every cell it computes.
        shard: (i, n): run only cells whose index in the grid is i mod n (parallel processes share the store).
        retry_failed: Run cells stored as failed again.
        config_dir: Folder of the shipped configs.
        quiet: No progress bar or per-cell lines.
        cell_fn: The cell runner (:func:`~fewstep.benchmarks.leaderboard.cells.run_cell`).

    Returns:
        Counts: ``ran``, ``cached``, ``failed`` (of this invocation's share of the grid).
    """
    root = budget_dir(cells_dir, budget)
    mine = [c for i, c in enumerate(grid_cells(methods, targets, seeds)) if i % shard[1] == shard[0]]
    counts = {"ran": 0, "cached": 0, "failed": 0}
    bar = _progress(len(mine), quiet)
    stamp = {"command": command, "host": host_label(), "commit": git_commit() or None, "eval_version": EVAL_VERSION}
    for method, target, seed in mine:
        path = cell_path(root, method, target, seed)
        old = read_json(path)
        if is_complete(old) or (old is not None and old.get("status") == "failed" and not retry_failed):
            counts["cached"] += 1
        else:
            bars = teacher_curve(target, seed, budget.n, bars_dir(root))
            t0, c0 = time.perf_counter(), time.process_time()
            rec = cell_fn(method, target, seed, budget, bars, config_dir)
            rec.update(stamp, cell_wall_s=time.perf_counter() - t0, cell_cpu_s=time.process_time() - c0)
            rec["computed_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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
    for target in targets:  # bars of every target, also when all its cells were computed by another shard
        for seed in seeds:
            teacher_curve(target, seed, budget.n, bars_dir(root))
    return counts
