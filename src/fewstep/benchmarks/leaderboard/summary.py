r"""Aggregate the cached cells of one budget into the leaderboard JSON (read by the markdown report and figure).

Per (method, target): MMD² (and ``fd`` on the digits target) mean and sample std over seeds at 1, 2, 4 NFE; the
bars (the teacher's Euler sampler at 4K, 8K, 16K steps, mean over the same seeds); a pass flag per NFE and bar
multiple (mean student < mean bar; with one seed a point comparison, so a margin under the estimator noise is a
tie in all but name); training cost. Per method: step time relative to flow matching (median over the targets
and seeds where both ran), evaluations per training sample, time to reach the bars, sampling throughput, and the
random-mixture pass counts of the 1-NFE (Euler-4) and 2-NFE (Euler-8) bars.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.runner import read_json
from fewstep.benchmarks.leaderboard.targets import BAR_MULTIPLES, EULER_NFE, STUDENT_NFE, is_random_target

__all__ = ["collect", "mean_std"]


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _bars(root: Path, target: str, seeds: list[int]) -> dict[str, dict[str, float]]:
    """Mean teacher Euler metrics per step count over the seeds with a cached curve."""
    recs = [r for s in seeds if (r := read_json(root / "bars" / f"{target.replace(':', '-')}__s{s}.json"))]
    out: dict[str, dict[str, float]] = {}
    for k in EULER_NFE:
        vals = [r["euler"][str(k)] for r in recs]
        if vals:
            out[str(k)] = {m: statistics.fmean(v[m] for v in vals) for m in vals[0]}
    return out


#: Method hyper-parameters that count training steps: a value >= the bench's steps means the schedule never ends.
SCHEDULE_KEYS = ("warmup_steps", "curriculum_steps")


def shipped_budget(config: str) -> dict[str, int]:
    """``train.steps`` and ``train.batch_size`` of a shipped config file (the defaults for ``"defaults"``)."""
    from fewstep.config.schema import RunConfig, load_config

    cfg = load_config(config) if config != "defaults" and Path(config).is_file() else RunConfig()
    return {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size}


def budget_notes(cell: dict[str, Any]) -> list[str]:
    """Schedules of the shipped method config that are longer than the bench's training (from the resolved config)."""
    steps = cell["budget"].get("steps", 0)
    mcfg = ((cell.get("resolved") or {}).get("method") or {}).get("cfg") or {}
    return [
        f"method.cfg.{k}={mcfg[k]} >= {steps} bench steps (schedule unfinished)"
        for k in SCHEDULE_KEYS
        if isinstance(mcfg.get(k), int) and mcfg[k] >= steps > 0
    ]


def collect(root: Path) -> dict[str, Any]:
    """The leaderboard dict of the budget folder ``root`` (cells, requests and bars cached there).

    Args:
        root: ``<run_dir>/<budget tag>``.

    Returns:
        JSON-able dict: ``budget``, ``commands``, ``methods``, ``targets`` (with dimension, components, bars),
        ``rows`` (per method and target), ``methods_summary`` (cost, time to bar, throughput, random pass counts),
        ``missing`` and ``failed`` cells.
    """
    requests = [r for p in sorted((root / "requests").glob("*.json")) if (r := read_json(p))]
    cells = [c for p in sorted((root / "cells").glob("*.json")) if (c := read_json(p))]
    grid = {tuple(g) for r in requests for g in r["grid"]}
    done = {(c["method"], c["target"], c["seed"]) for c in cells}
    methods = list(dict.fromkeys([g[0] for r in requests for g in r["grid"]] + [c["method"] for c in cells]))
    targets = list(dict.fromkeys([g[1] for r in requests for g in r["grid"]] + [c["target"] for c in cells]))
    ok = [c for c in cells if c.get("status") == "ok"]
    out: dict[str, Any] = {
        "budget": (requests[0]["budget"] if requests else (cells[0]["budget"] if cells else {})),
        "commands": list(dict.fromkeys(r["command"] for r in requests)),
        "methods": methods,
        "targets": {},
        "rows": [],
        "methods_summary": {},
        "missing": sorted([list(g) for g in grid - done]),
        "failed": [
            {"method": c["method"], "target": c["target"], "seed": c["seed"], "error": c.get("error")}
            for c in cells
            if c.get("status") != "ok"
        ],
    }
    for t in targets:
        seeds = sorted({c["seed"] for c in ok if c["target"] == t} | {g[2] for g in grid if g[1] == t})
        bar_rec = next(
            (r for s in seeds if (r := read_json(root / "bars" / f"{t.replace(':', '-')}__s{s}.json"))), None
        )
        out["targets"][t] = {
            "dim": bar_rec["dim"] if bar_rec else None,
            "components": bar_rec.get("components") if bar_rec else None,
            "euler": _bars(root, t, seeds),
            "random": is_random_target(t),
        }
    fm = {(c["target"], c["seed"]): c["step_s"] for c in ok if c["method"] == "flow_matching"}
    for m in methods:
        mine = [c for c in ok if c["method"] == m]
        for t in targets:
            cs = [c for c in mine if c["target"] == t]
            if not cs:
                continue
            euler = out["targets"][t]["euler"]
            row: dict[str, Any] = {
                "method": m,
                "target": t,
                "seeds": [c["seed"] for c in cs],
                "nfe": {},
                "sampler": cs[0]["sampler"],
                "design_limits": cs[0].get("design_limits", {}),
            }
            for k in STUDENT_NFE:
                vals = [c["final"][str(k)]["mmd2"] for c in cs]
                mu, sd = mean_std(vals)
                ent: dict[str, Any] = {"mmd2": mu, "mmd2_std": sd, "mmd2_values": vals}
                if "fd" in cs[0]["final"][str(k)]:
                    ent["fd"], ent["fd_std"] = mean_std([c["final"][str(k)]["fd"] for c in cs])
                ent["pass"] = {
                    str(mult): (mu < euler[str(mult * k)]["mmd2"]) if str(mult * k) in euler else None
                    for mult in BAR_MULTIPLES
                }
                row["nfe"][str(k)] = ent
            row["step_s"] = statistics.fmean(c["step_s"] for c in cs)
            ratios = [c["step_s"] / fm[(t, c["seed"])] for c in cs if (t, c["seed"]) in fm]
            row["step_vs_fm"] = statistics.fmean(ratios) if ratios else None
            out["rows"].append(row)
        if not mine:
            continue
        ratios = [c["step_s"] / fm[(c["target"], c["seed"])] for c in mine if (c["target"], c["seed"]) in fm]
        summary: dict[str, Any] = {
            "cells": len(mine),
            "sampler": mine[0]["sampler"],
            "config": mine[0]["config"],
            "step_ms": 1000 * _median([c["step_s"] for c in mine]),
            "step_vs_fm": _median(ratios),
            "train_s": _median([c["train_s"] for c in mine]),
            "prepare_s": _median([c["prepare_s"] for c in mine]),
            "net_evals_per_sample": _median([c["net_evals_per_sample"] for c in mine]),
            "teacher_evals_per_sample": _median([c["teacher_evals_per_sample"] for c in mine]),
            "prepare_teacher_evals": _median([c["prepare_teacher_evals"] for c in mine]),
            "throughput": {str(k): _median([c["throughput"][str(k)] for c in mine]) for k in STUDENT_NFE},
            "time_to_bar": {},
            "random_pass": {},
            "design_limits": mine[0].get("design_limits", {}),
            "shipped": shipped_budget(mine[0]["config"]),
            "budget_notes": budget_notes(mine[0]),
        }
        for k in STUDENT_NFE:
            hits = [c["time_to_bar_s"][str(k)] for c in mine if c["time_to_bar_s"][str(k)] is not None]
            summary["time_to_bar"][str(k)] = {"reached": len(hits), "of": len(mine), "median_s": _median(hits)}
        rand = [r for r in out["rows"] if r["method"] == m and is_random_target(r["target"])]
        for k in STUDENT_NFE:  # the headline bar of K NFE: Euler at 4K steps
            flags = [r["nfe"][str(k)]["pass"]["4"] for r in rand]
            summary["random_pass"][str(k)] = {
                "euler_steps": 4 * k,
                "passed": sum(bool(f) for f in flags),
                "of": len(flags),
            }
        out["methods_summary"][m] = summary
    return out
