r"""Aggregate the cached cells of one budget into the leaderboard JSON (read by the markdown report and figure).

Per (method, target): MMD² (and ``fd`` on the digits target) mean and sample std over seeds at 1, 2, 4 NFE; the
bars (the teacher's Euler sampler at 4K, 8K, 16K steps, mean over the same seeds); a pass flag per NFE and bar
multiple (mean student < mean bar; with one seed a point comparison, so a margin under the estimator noise is a
tie in all but name); training cost. Per method: step time relative to flow matching (median over the targets
and seeds where both ran), evaluations per training sample, time to reach the bars, sampling throughput, and the
random-mixture pass counts of the 1-NFE (Euler-4) and 2-NFE (Euler-8) bars.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.cell_setup import CONFIG_DIR, Budget, cell_config, shipped_design_limits
from fewstep.benchmarks.leaderboard.init import init_cost
from fewstep.benchmarks.leaderboard.store import bars_dir, cell_path, read_json, stale_nfe
from fewstep.benchmarks.leaderboard.targets import BAR_MULTIPLES, EULER_NFE, STUDENT_NFE, bar_file, is_random_target
from fewstep.methods.registry import list_methods

__all__ = ["collect", "mean_std"]


@functools.cache
def _shipped_limits(method: str) -> dict[str, str]:
    return shipped_design_limits(method)


def _limits(cell: dict[str, Any]) -> dict[str, str]:
    """Design limits from the method's shipped config as it is now (a cell stores the ones of its run time; those
    are used only for a method that is no longer registered)."""
    if cell["method"] in list_methods():
        return _shipped_limits(cell["method"])
    return cell.get("design_limits", {})


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _bars(
    curves: dict[tuple[str, int], Any], target: str, seeds: list[int], key: str = "euler", entries: Any = EULER_NFE
) -> dict[str, dict[str, float]]:
    """Mean teacher metrics per entry (Euler step count; or floor) over the seeds with a stored curve."""
    recs = [r for s in seeds if (r := curves.get((target, s))) and key in r]
    out: dict[str, dict[str, float]] = {}
    for k in entries:
        vals = [r[key][str(k)] for r in recs]
        if vals:
            out[str(k)] = {m: statistics.fmean(v[m] for v in vals) for m in vals[0]}
    return out


#: Method hyper-parameters that count training steps: a value >= the bench's steps means the schedule never ends.
SCHEDULE_KEYS = ("warmup_steps", "curriculum_steps")


def _config_file(config: str) -> Path | None:
    """A record's config path (absolute, or relative to the repository root), if the file exists."""
    if config in ("defaults", "?", ""):
        return None
    p = Path(config)
    for cand in (p, CONFIG_DIR.parent / p, CONFIG_DIR / p.name):
        if cand.is_file():
            return cand
    return None


def shipped_budget(config: str) -> dict[str, int]:
    """``train.steps`` and ``train.batch_size`` of a shipped config file (the defaults for ``"defaults"``)."""
    from fewstep.config.schema import RunConfig, load_config

    path = _config_file(config)
    cfg = load_config(path) if path is not None else RunConfig()
    return {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size}


def budget_notes(cell: dict[str, Any]) -> list[str]:
    """Schedules of the method config that are longer than the bench's training, and the cell's init if any.

    From the record's resolved config, else (an imported record) from the current config of the cell.
    """
    steps = cell["budget"].get("steps", 0)
    if "resolved" in cell:
        mcfg = ((cell.get("resolved") or {}).get("method") or {}).get("cfg") or {}
    else:
        mcfg = cell_config(cell["method"], cell["target"], cell["seed"], Budget(**cell["budget"])).method.cfg
    notes = [
        f"method.cfg.{k}={mcfg[k]} >= {steps} bench steps (schedule unfinished)"
        for k in SCHEDULE_KEYS
        if isinstance(mcfg.get(k), int) and mcfg[k] >= steps > 0
    ]
    init = cell.get("init")
    if init:  # Method.needs_init (cells.run_cell): the cell costs the init's steps plus its own
        notes.append(
            f"includes a {init['method']} init of {init['steps']} steps (student.init_from): the cell costs "
            f"{init['steps']} {init['method']} + {steps} own steps; time to bar counts the init's training"
        )
    return notes


def _row(
    cs: list[dict[str, Any]], curves: dict[tuple[str, int], Any], fm: dict[tuple, dict[str, Any]]
) -> dict[str, Any]:
    """One (method, target) row from its cells: per NFE the seeds with a valid entry, pass flags, cost.

    The bar of an entry is the teacher's Euler curve averaged over the same seeds as the entry.
    """
    c0 = cs[0]
    row: dict[str, Any] = {
        "method": c0["method"],
        "target": c0["target"],
        "seeds": [c["seed"] for c in cs],
        "nfe": {},
        "sampler": c0["sampler"],
        "design_limits": _limits(c0),
        "imported": sum("imported_from" in c for c in cs),
    }
    for k in STUDENT_NFE:
        got = [c for c in cs if str(k) in c["final"]]
        if not got:
            continue
        vals = [c["final"][str(k)]["mmd2"] for c in got]
        mu, sd = mean_std(vals)
        ent: dict[str, Any] = {"mmd2": mu, "mmd2_std": sd, "mmd2_values": vals, "seeds": [c["seed"] for c in got]}
        euler = _bars(curves, c0["target"], ent["seeds"])
        if "fd" in got[0]["final"][str(k)]:
            ent["fd"], ent["fd_std"] = mean_std([c["final"][str(k)]["fd"] for c in got])
            ent["pass_fd"] = {  # the same bars in the digit-classifier features
                str(mult): (ent["fd"] < euler[str(mult * k)]["fd"]) if "fd" in euler.get(str(mult * k), {}) else None
                for mult in BAR_MULTIPLES
            }
        ent["pass"] = {
            str(mult): (mu < euler[str(mult * k)]["mmd2"]) if str(mult * k) in euler else None
            for mult in BAR_MULTIPLES
        }
        row["nfe"][str(k)] = ent
    row["step_s"] = statistics.fmean(c["step_s"] for c in cs)
    ratios = _fm_ratios(cs, fm)
    row["step_vs_fm"] = statistics.fmean(ratios) if ratios else None
    return row


def _fm_ratios(cs: list[dict[str, Any]], fm: dict[tuple, dict[str, Any]]) -> list[float]:
    """Step time over flow matching's on the same target and seed, only where both ran on the same host."""
    out = []
    for c in cs:
        f = fm.get((c["target"], c["seed"]))
        if f is not None and f.get("host") == c.get("host") and f.get("step_s") and c.get("step_s"):
            out.append(c["step_s"] / f["step_s"])
    return out


def _method_summary(m: str, mine: list[dict[str, Any]], rows: list[dict[str, Any]], fm: dict) -> dict[str, Any]:
    """Cost, time to the bars, throughput and random-mixture pass counts of one method."""
    timed = [c for c in mine if "train_s" in c]  # imported records carry only step_s
    summary: dict[str, Any] = {
        "cells": len(mine),
        "timed_cells": len(timed),
        "sampler": mine[0]["sampler"],
        "config": mine[0]["config"],
        "step_ms": 1000 * _median([c["step_s"] for c in (timed or mine)]),
        "step_vs_fm": _median(_fm_ratios(mine, fm)),
        "train_s": _median([c["train_s"] for c in timed]),
        "prepare_s": _median([c["prepare_s"] for c in timed]),
        "net_evals_per_sample": _median([c["net_evals_per_sample"] for c in timed]),
        "teacher_evals_per_sample": _median([c["teacher_evals_per_sample"] for c in timed]),
        "prepare_teacher_evals": _median([c["prepare_teacher_evals"] for c in timed]),
        "init": init_cost(mine),  # Method.needs_init: the init run's steps and evaluations (None without one)
        "throughput": {str(k): _median([c["throughput"][str(k)] for c in timed]) for k in STUDENT_NFE},
        "time_to_bar": {},
        "random_pass": {},
        "design_limits": _limits(mine[0]),
        "shipped": shipped_budget(mine[0]["config"]),
        "budget_notes": budget_notes(mine[0]),
    }
    for k in STUDENT_NFE:
        hits = [c["time_to_bar_s"][str(k)] for c in timed if c["time_to_bar_s"][str(k)] is not None]
        summary["time_to_bar"][str(k)] = {"reached": len(hits), "of": len(timed), "median_s": _median(hits)}
    rand = [r for r in rows if r["method"] == m and is_random_target(r["target"])]
    for k in STUDENT_NFE:  # the headline bar of K NFE: Euler at 4K steps
        flags = [r["nfe"][str(k)]["pass"]["4"] for r in rand if str(k) in r["nfe"]]
        summary["random_pass"][str(k)] = {
            "euler_steps": 4 * k,
            "passed": sum(bool(f) for f in flags),
            "of": len(flags),
        }
    return summary


def collect(root: Path, grid: list[tuple[str, str, int]]) -> dict[str, Any]:
    """The leaderboard dict of the cells of ``grid`` stored under the budget folder ``root``.

    Args:
        root: ``<cells_dir>/<budget tag>``.
        grid: The requested (method, target, seed) cells.

    Returns:
        JSON-able dict: ``budget``, ``commands``, ``methods``, ``targets`` (with dimension, components, bars),
        ``rows`` (per method and target), ``methods_summary`` (cost, time to bar, throughput, random pass counts),
        ``missing`` cells (no record), ``stale`` entries (recorded with an older evaluation, to recompute),
        ``failed`` cells, ``hosts`` and ``imported`` counts.
    """
    grid = [tuple(g) for g in grid]
    recs = {g: read_json(cell_path(root, *g)) for g in grid}
    curves = {(t, s): read_json(bar_file(bars_dir(root), t, s)) for t, s in {(g[1], g[2]) for g in grid}}
    cells = [r for r in recs.values() if r]
    ok = [c for c in cells if c.get("status") == "ok"]
    methods = list(dict.fromkeys(g[0] for g in grid))
    targets = list(dict.fromkeys(g[1] for g in grid))
    out: dict[str, Any] = {
        "budget": cells[0]["budget"] if cells else {},
        "commands": list(dict.fromkeys(c["command"] for c in cells if c.get("command"))),
        "methods": methods,
        "targets": {},
        "rows": [],
        "methods_summary": {},
        "missing": sorted([list(g) for g, r in recs.items() if r is None]),
        "stale": [
            {"method": c["method"], "target": c["target"], "seed": c["seed"], "nfe": sorted(st)}
            for c in ok
            if (st := {**stale_nfe(c), **c.get("stale", {})})
        ],
        "failed": [
            {"method": c["method"], "target": c["target"], "seed": c["seed"], "error": c.get("error")}
            for c in cells
            if c.get("status") != "ok"
        ],
        "hosts": dict(sorted({h: sum(c.get("host") == h for c in ok) for h in {c.get("host") for c in ok}}.items())),
        "imported": sum("imported_from" in c for c in ok),
        "imported_from": sorted({c["imported_from"] for c in ok if "imported_from" in c}),
    }
    for c in ok:  # entries an older evaluation recorded are not metrics of the current one
        c["final"] = {k: v for k, v in c["final"].items() if k not in stale_nfe(c)}
    for t in targets:
        seeds = sorted({g[2] for g in grid if g[1] == t})
        bar_rec = next((r for s in seeds if (r := curves.get((t, s)))), None)
        out["targets"][t] = {
            "dim": bar_rec["dim"] if bar_rec else None,
            "components": bar_rec.get("components") if bar_rec else None,
            "euler": _bars(curves, t, seeds),
            "random": is_random_target(t),
        }
        if bar_rec and "floor" in bar_rec:  # a learned target: its teacher, reference and floors
            out["targets"][t].update(
                teacher=bar_rec["teacher"],
                reference=bar_rec["reference"],
                floor=_bars(curves, t, seeds, "floor", ("teacher_ode", "real_train")),
            )
    fm = {(c["target"], c["seed"]): c for c in ok if c["method"] == "flow_matching"}
    for m in methods:
        mine = [c for c in ok if c["method"] == m]
        for t in targets:
            cs = [c for c in mine if c["target"] == t]
            if cs:
                out["rows"].append(_row(cs, curves, fm))
        if mine:
            out["methods_summary"][m] = _method_summary(m, mine, out["rows"], fm)
    return out
