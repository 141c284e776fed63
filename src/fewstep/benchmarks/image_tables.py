r"""Summary table of image students over training seeds, with the issue's bars against the teacher's Euler.

Input: the JSON files that ``python -m fewstep.benchmarks.image_bench students RUN --out F.md`` writes (one per
run; rows named ``"<method> <nfe>"``) or that ``fewstep eval RUN --out F.json`` writes for an image run (a dict; its
method is the run folder's name up to the first ``-``, e.g. ``runs/images/scm-lf-x2`` -> ``scm``, its steps the
checkpoint's), every one made with the same evaluation seed as the teacher table, and that teacher table's JSON.
Rows of one method from several files are its training seeds: the table gives mean ± sample std over them (std only
with >= 2 seeds).

Bars (issue 12): 1-NFE FD below the teacher's Euler 4, 2-NFE FD below its Euler 8. With one seed the verdict is
the comparison of that run; with several it is ``met`` / ``miss`` only when the mean is more than two standard
errors (sample std / sqrt(n)) on one side, else ``tie`` (the teacher's value is one evaluation at this seed: its own
evaluation-noise spread, ~2 FD over evaluation seeds 0-2 at Euler 4, is not included).

A bar a method's config cannot meet by design (``--configs``: the shipped image configs; the rule of
:func:`fewstep.benchmarks.leaderboard.cell_setup.design_limits`, as on the leaderboard: a one-step DMD generator
does not claim 2 NFE, a 2-window PeRFlow cannot jump at 1 NFE) reads ``by design`` instead of a verdict.

``python -m fewstep.benchmarks.image_tables --teacher T.json --evals A.json B.json ... [--configs C.yaml ...]
--out FILE.md``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["collect", "bar", "config_limits", "summary_rows", "markdown", "main"]


def collect(files: Sequence[str | Path]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Rows of the eval JSON files grouped as method -> NFE -> one row per file (training seed)."""
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for f in files:
        for r in _rows(json.loads(Path(f).read_text())):
            method = r["sampler"].rsplit(" ", 1)[0]
            out.setdefault(method, {}).setdefault(int(r["nfe"]), []).append(r)
    return out


def _rows(data: Any) -> list[dict[str, Any]]:
    """image_bench's row list as is; a ``fewstep eval`` dict as rows ``"<method> <nfe>"`` (method: its run folder)."""
    if isinstance(data, list):
        return data
    method = Path(data["run_dir"]).name.split("-")[0]
    return [dict(r, sampler=f"{method} {k}", nfe=int(k), steps=int(data["checkpoint_step"]))
            for k, r in sorted(data["student"].items(), key=lambda kv: int(kv[0]))]


def bar(values: Sequence[float], teacher: float) -> str:
    """``met`` / ``miss`` / ``tie`` of FD values (one per seed) against the teacher's FD (2-standard-error rule)."""
    if len(values) == 1:
        return "met" if values[0] < teacher else "miss"
    m, se = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
    if m + 2 * se < teacher:
        return "met"
    return "miss" if m - 2 * se > teacher else "tie"


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def config_limits(paths: Sequence[str | Path]) -> dict[str, dict[int, str]]:
    """Method name -> {NFE: reason} of the bars each config cannot meet by design (``design_limits``)."""
    from fewstep.benchmarks.leaderboard.cell_setup import design_limits
    from fewstep.config.schema import load_config

    out: dict[str, dict[int, str]] = {}
    for path in paths:
        cfg = load_config(Path(path))
        out[cfg.method.name] = design_limits(cfg)
    return out


def summary_rows(groups: dict[str, dict[int, list[dict[str, Any]]]], teacher: list[dict[str, Any]],
                 limits: dict[str, dict[int, str]] | None = None) -> list[dict[str, Any]]:
    """One summary row per method: FD per NFE (per-seed lists), 1-NFE precision/recall/class acc, bars.

    Args:
        groups: :func:`collect`'s method -> NFE -> rows.
        teacher: The teacher table's rows (``Euler 4`` and ``Euler 8`` are the bars).
        limits: :func:`config_limits`; a bar at a design-limited NFE reads ``by design``.

    Returns:
        One dict per method.
    """
    t = {r["sampler"]: r["fd"] for r in teacher}
    limits = limits or {}
    rows = []
    for method, by_nfe in groups.items():
        fd = {k: [r["fd"] for r in v] for k, v in sorted(by_nfe.items())}
        one = by_nfe.get(1, [])
        row: dict[str, Any] = {"method": method, "seeds": max(len(v) for v in fd.values()),
                               "steps": sorted({int(r.get("steps", 0)) for v in by_nfe.values() for r in v}),
                               "fd": fd}
        for key in ("precision", "recall", "class_acc"):
            row[f"{key}_1"] = statistics.mean(r[key] for r in one) if one else float("nan")
        lim = limits.get(method, {})
        row["bar_1_vs_euler4"] = "by design" if 1 in lim else bar(fd[1], t["Euler 4"]) if 1 in fd else "-"
        row["bar_2_vs_euler8"] = "by design" if 2 in lim else bar(fd[2], t["Euler 8"]) if 2 in fd else "-"
        row["design"] = {str(k): v for k, v in lim.items() if k in (1, 2)}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], teacher: list[dict[str, Any]]) -> str:
    """The summary as a markdown table, teacher rows first."""
    lines = ["| method | train steps | seeds | FD 1 NFE | FD 2 NFE | FD 4 NFE | 1-NFE prec / rec / class acc | "
             "1 NFE < Euler 4 | 2 NFE < Euler 8 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in teacher:
        lines.append(f"| teacher {r['sampler']} | - | - | {r['fd']:.2f} (NFE {r['nfe']}) | | | "
                     f"{r['precision']:.3f} / {r['recall']:.3f} / {r['class_acc']:.3f} | | |")
    for r in rows:
        fd = r["fd"]
        prc = ("-" if math.isnan(r["precision_1"]) else  # no 1-NFE rows (e.g. a 2-window PeRFlow evaluated at 2 / 4)
               f"{r['precision_1']:.3f} / {r['recall_1']:.3f} / {r['class_acc_1']:.3f}")
        lines.append(f"| {r['method']} | {'/'.join(map(str, r['steps']))} | {r['seeds']} | {_fmt(fd.get(1, []))} | "
                     f"{_fmt(fd.get(2, []))} | {_fmt(fd.get(4, []))} | {prc} | {r['bar_1_vs_euler4']} | "
                     f"{r['bar_2_vs_euler8']} |")
    notes = [f"- {r['method']}, {k} NFE: {why}" for r in rows for k, why in r.get("design", {}).items()]
    if notes:
        lines += ["", "Bars not claimed (from the configs, as on the leaderboard):", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write FILE.md and FILE.json from a teacher JSON and student eval JSONs."""
    p = argparse.ArgumentParser(prog="python -m fewstep.benchmarks.image_tables")
    p.add_argument("--teacher", required=True)
    p.add_argument("--evals", nargs="+", required=True)
    p.add_argument("--configs", nargs="*", default=[], help="the students' configs: bars they skip by design")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    teacher = [r for r in json.loads(Path(a.teacher).read_text()) if r["sampler"] != "Euler 1"]
    try:
        limits = config_limits(a.configs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--configs: {e}") from None
    rows = summary_rows(collect(a.evals), teacher, limits)
    text = markdown(rows, [r for r in teacher if r["sampler"] != "Euler 2"])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    record = {"teacher": teacher, "students": rows, "evals": a.evals, "configs": a.configs}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
