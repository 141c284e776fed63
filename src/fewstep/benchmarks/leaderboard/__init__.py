"""``fewstep bench``: every method x targets x NFE 1, 2, 4 x seeds at one equal budget, cached cell by cell.

Modules: :mod:`~fewstep.benchmarks.leaderboard.targets` (targets, teacher Euler bars),
:mod:`~fewstep.benchmarks.leaderboard.cells` (one cell: shipped config, common budget, own sampler),
:mod:`~fewstep.benchmarks.leaderboard.runner` (the resumable grid), :mod:`~fewstep.benchmarks.leaderboard.summary`
(aggregation), :mod:`~fewstep.benchmarks.leaderboard.report` (markdown),
:mod:`~fewstep.benchmarks.leaderboard.figure` (quality vs NFE) and :mod:`~fewstep.benchmarks.leaderboard.store`
(the tracked per-cell metric records, ``docs/leaderboard_cells``).
"""

from __future__ import annotations

from pathlib import Path

from fewstep.benchmarks.leaderboard.cells import Budget
from fewstep.benchmarks.leaderboard.runner import budget_dir, run_grid
from fewstep.benchmarks.leaderboard.store import write_json

__all__ = ["Budget", "run_grid", "write_leaderboard"]


def write_leaderboard(
    cells_dir: str | Path,
    budget: Budget,
    grid: list[tuple[str, str, int]],
    out: str | Path,
    figure: bool = True,
    page_command: str = "",
) -> dict:
    """Aggregate the stored cells of ``grid`` at ``budget`` into ``out`` (markdown), ``out`` .json and ``out`` .png.

    Args:
        cells_dir: The cell store.
        budget: Selects ``<cells_dir>/<budget tag>``.
        grid: The requested (method, target, seed) cells (the page lists those without a record as missing).
        out: Markdown path; the JSON and figure take its stem.
        figure: Draw the figure (skipped with a note when matplotlib is missing).
        page_command: The command writing the page, shown on it.

    Returns:
        The leaderboard dict written to the JSON file.
    """
    from fewstep.benchmarks.leaderboard.figure import save_figure
    from fewstep.benchmarks.leaderboard.report import markdown
    from fewstep.benchmarks.leaderboard.summary import collect

    out = Path(out)
    d = collect(budget_dir(cells_dir, budget), grid)
    png = out.with_suffix(".png")
    note = save_figure(d, png) if figure else "disabled (--no-figure)"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(d, png.name if not note else None, note, page_command))
    write_json(out.with_suffix(".json"), d)
    return d
