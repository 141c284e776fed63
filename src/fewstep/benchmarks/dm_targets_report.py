r"""Report of :mod:`fewstep.benchmarks.dm_targets`: merge per-process JSON files, write dm_targets.md/.json.

Every number is a mean over seeds with a 95 % t-interval, :math:`\bar x \pm t_{0.975,n-1}\,s/\sqrt n`. The
target a student lands on is decided per (variant, w, NFE) from paired per-seed differences: with targets sorted by
mean MMD², the nearest one is named when the 95 % interval of (second − nearest) excludes 0, else the row reads
"tie a/b".
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

__all__ = [
    "TARGETS",
    "NFES",
    "ci95",
    "nearest_target",
    "clean_command",
    "as_parts",
    "merge",
    "report",
    "merge_and_report",
]

TARGETS: tuple[str, ...] = ("guided_ode", "tilted", "mixture")  #: the three targets of fewstep.benchmarks.dm_targets
NFES: tuple[int, ...] = (1, 2, 4)  #: student step counts scored

UNTRAINED = "teacher init"  #: name prefix of the untrained starting point (budget 0 steps)
SHORT = {"guided_ode": "ODE", "tilted": "tilted", "mixture": "w=1 mix"}


def ci95(vals: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval); half-width nan for one value."""
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def fmt(vals: list[float]) -> str:
    m, h = ci95(vals)
    return f"{m:.4f} ± {h:.4f}"


def nearest_target(per_seed: list[dict[str, float]], gap: float | None = None) -> str:
    """The nearest target by mean MMD², or "tie a/b" when the paired 95 % interval of the gap contains 0.

    With ``gap`` (the smallest pairwise MMD² between the targets at this w) a student whose distance to its nearest
    target is at least ``gap`` is "at none": it is farther from every target than the targets are from each other.
    """
    means = {t: sum(r[t] for r in per_seed) / len(per_seed) for t in TARGETS}
    first, second = sorted(TARGETS, key=lambda t: means[t])[:2]
    lo = ci95([r[second] - r[first] for r in per_seed])
    name = SHORT[first] if len(per_seed) > 1 and lo[0] - lo[1] > 0 else f"tie {SHORT[first]}/{SHORT[second]}"
    if gap is not None and means[first] >= gap:
        return f"at none (≥ target gap {gap:.3f}; nearer {name})"
    return name


def clean_command(cmd: str, names: tuple[str, ...] = ()) -> str:
    """An earlier run's command made repo-relative and copy-pasteable.

    Output folders under ``/tmp/dmt/`` become ``runs/dm_targets`` (the per-seed JSON names stay distinct), and the
    variant names after ``--only`` are shell-quoted (they contain spaces; ``names`` are the known ones, matched
    longest first).
    """
    cmd = re.sub(r"/tmp/dmt/runs\d*", "runs/dm_targets", cmd)
    if " --only " not in cmd or "'" in cmd:
        return cmd
    head, rest = cmd.split(" --only ", 1)
    only, sep, tail = rest.partition(" --")
    quoted = []
    while only:
        match = max((n for n in names if only.startswith(n)), key=len, default=None)
        if match is None:  # unknown name: leave the command as it was
            return cmd
        quoted.append(shlex.quote(match))
        only = only[len(match) :].lstrip()
    return f"{head} --only {' '.join(quoted)}{sep}{tail}"


def as_parts(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """One run's JSON as a list of parts; a merged ``dm_targets.json`` (keyed by preset) is split back into parts.

    A merged file keeps separations by sample size and students by budget (``students[name][w][steps][seed]``,
    run settings in ``runs[steps]``); files written before budgets were recorded hold ``students[name][w][seed]``
    with the run settings in ``runs[name]``.
    """
    if "preset" in obj:
        return [obj]
    parts = []
    for m in obj.values():
        base = {k: m[k] for k in ("preset", "seeds", "pretrain_steps")}
        empty = {"separation": {}, "teacher": {}, "students": {}, "commands": []}
        parts.append(
            {
                **base,
                **empty,
                "n": m.get("student_n"),
                "run": {},
                "commands": m["commands"],
                "teacher": m.get("teacher", {}),
            }
        )
        for n, by_w in m["separation"].items():
            parts.append({**base, **empty, "n": int(n), "run": {}, "separation": by_w})
        for name, by_w in m["students"].items():
            for w, per in by_w.items():
                legacy = any("metrics" in r for r in per.values())
                by_steps = {str(m["runs"][name]["steps"]): per} if legacy else per
                for steps, recs in by_steps.items():
                    run = m["runs"][name] if legacy else m["runs"].get(steps, {"steps": int(steps)})
                    parts.append({**base, **empty, "n": m["student_n"], "run": run, "students": {name: {w: recs}}})
    return parts


def merge(parts: list[dict[str, Any]], names: tuple[str, ...] = ()) -> dict[str, Any]:
    """Union of several runs' JSON (same preset): separations by n and w, students by w and budget (steps)."""
    res: dict[str, Any] = {
        **{k: parts[0][k] for k in ("preset", "pretrain_steps")},
        "commands": [],
        "separation": {},
        "teacher": {},
        "students": {},
        "runs": {},
    }
    for p in parts:
        cleaned = [clean_command(c, names) for c in p["commands"]]
        res["commands"] += [c for c in cleaned if c not in res["commands"]]
        for w, per in p["separation"].items():  # separations by sample size n, then w
            res["separation"].setdefault(str(p["n"]), {}).setdefault(w, {}).update(per)
        for w, per in p.get("teacher", {}).items():
            res["teacher"].setdefault(w, {}).update(per)
        for name, by_w in p["students"].items():
            untrained = name.startswith(UNTRAINED)  # the teacher init is scored after 0 steps whatever --steps says
            steps = "0" if untrained else str(p["run"]["steps"])
            for w, per in by_w.items():
                res["students"].setdefault(name, {}).setdefault(w, {}).setdefault(steps, {}).update(per)
            if not untrained:
                res["runs"][steps] = p["run"]
            res["student_n"] = p["n"]
    res["seeds"] = sorted({int(s) for by_n in res["separation"].values() for by_w in by_n.values() for s in by_w})
    return res


def report(res: dict[str, Any], cmd: str) -> str:
    """Markdown: the targets' separation per w, then each student's MMD² to every target with the verdict."""
    lines = [
        f"## {res['preset']}",
        "",
        "Commands: " + " ; ".join(f"`{c}`" for c in res["commands"]) + f" ; then `{cmd}`.",
        "",
    ]
    keys = [f"{a} vs {b}" for i, a in enumerate(TARGETS) for b in TARGETS[i + 1 :]] + [f"floor {t}" for t in TARGETS]
    for n, by_w in sorted(res["separation"].items(), key=lambda kv: -int(kv[0])):
        lines += [
            f"### How far apart the three targets are ({n} vs {n} samples; MMD², mean ± 95 % CI over seeds)",
            "",
            "| w | seeds | ODE vs tilted | ODE vs w=1 mix | tilted vs w=1 mix | floor ODE | floor tilted "
            "| floor w=1 mix |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for w, per in sorted(by_w.items(), key=lambda kv: float(kv[0])):
            rows = list(per.values())
            lines.append(f"| {w} | {len(rows)} | " + " | ".join(fmt([r[k] for r in rows]) for k in keys) + " |")
        lines.append("")
    if res.get("teacher"):
        lines += [
            "### Guided teacher, Euler with K steps, on the students' noise and labels (MMD² to each target)",
            "",
            "| w | K | to guided ODE | to tilted | to w=1 mixture |",
            "|---|---|---|---|---|",
        ]
        for w, per in sorted(res["teacher"].items(), key=lambda kv: float(kv[0])):
            rows = list(per.values())
            for k in rows[0]:
                lines.append(f"| {w} | {k} | " + " | ".join(fmt([r[k][t] for r in rows]) for t in TARGETS) + " |")
        lines.append("")
    if res["students"]:
        lines += students_table(res)
        for k in NFES:  # paired differences at every NFE (1 and 2 NFE too)
            lines += ablation_table(res, str(k))
    return "\n".join(lines) + "\n"


def students_table(res: dict[str, Any]) -> list[str]:
    """Rows of the students' table: MMD² to each target per (w, budget, variant, NFE) and the verdict.

    Where the targets are not resolved apart at a w (the 95 % interval of their smallest pairwise MMD² reaches 0,
    as at w = 1) the verdict is "targets coincide": there is one target and only the distance to it has meaning.
    """
    run = {k: v for k, v in next(iter(res["runs"].values())).items() if k != "steps"}
    lines = [
        "",
        "### Students: MMD² to each target (mean ± 95 % CI) and the nearest target",
        "",
        f"Run settings (every variant; the budget is the steps column): {run}; teacher init "
        f"{res['pretrain_steps']} flow-matching steps; EMA 0.99 student; {res['student_n']} samples, the targets' "
        "labels.",
        "",
        "| w | steps | student | NFE | seeds | to guided ODE | to tilted | to w=1 mixture | nearest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seps = res["separation"].get(str(res["student_n"]), {})
    pairs = [f"{a} vs {b}" for i, a in enumerate(TARGETS) for b in TARGETS[i + 1 :]]
    gaps: dict[str, float | None] = {}
    for w, per in seps.items():
        lo = min(ci95([r[k] for r in per.values()]) for k in pairs)
        gaps[w] = lo[0] if lo[0] - lo[1] > 0 else None  # None: the targets coincide at this w
    keys = {(w, steps) for by_w in res["students"].values() for w, by_s in by_w.items() for steps in by_s}
    for w, steps in sorted(keys, key=lambda k: (float(k[0]), int(k[1]))):
        for name, by_w in res["students"].items():
            recs = list(by_w.get(w, {}).get(steps, {}).values())
            if not recs:
                continue
            for k in NFES:
                per_seed = [r["metrics"][str(k)] for r in recs]
                head = f"| {w} | {steps} | {name} | {k} | {len(recs)} | "
                if any(not math.isfinite(v) for r in per_seed for v in r.values()):
                    lines.append(head + "diverged (non-finite samples) | | | |")
                    continue
                verdict = "targets coincide" if w in gaps and gaps[w] is None else nearest_target(per_seed, gaps.get(w))
                lines.append(head + " | ".join(fmt([r[t] for r in per_seed]) for t in TARGETS) + f" | {verdict} |")
    return lines


def ablation_table(res: dict[str, Any], nfe: str = "4") -> list[str]:
    """Paired per-seed differences MMD²(ablation) − MMD²(its full variant) to each target, at ``nfe`` steps.

    An ablation is a variant named ``"<base>, <change>"`` whose full variant is named ``"<base> (...)"``; pairs are
    formed over the seeds both were run with at the same w and budget (same init, labels, noise and targets). A
    difference whose 95 % interval excludes 0 is marked with *.
    """
    studs = res["students"]
    lines = [
        "",
        f"### Ablations: MMD²(ablation) − MMD²(full variant), paired by seed, {nfe} NFE (* = CI excludes 0)",
        "",
        "| w | steps | ablation | vs | seeds | Δ to guided ODE | Δ to tilted | Δ to w=1 mixture |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in studs:
        base = name.split(", ", 1)[0] if ", " in name else None
        full = next((f for f in studs if base and f.startswith(base + " (")), None)
        if full is None:
            continue
        for w, by_s in studs[name].items():
            for steps, recs in by_s.items():
                ref = studs[full].get(w, {}).get(steps, {})
                seeds = sorted(set(recs) & set(ref), key=int)
                if len(seeds) < 2:
                    continue
                cells = []
                for t in TARGETS:
                    m, h = ci95([recs[s]["metrics"][nfe][t] - ref[s]["metrics"][nfe][t] for s in seeds])
                    cells.append(f"{m:+.3f} ± {h:.3f}{'*' if abs(m) > h else ''}")
                lines.append(f"| {w} | {steps} | {name} | {full} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 5 else []


def merge_and_report(paths: list[Path], out: Path, cmd: str, names: tuple[str, ...] = ()) -> str:
    """Merge JSON files (per-run files or an earlier merged dm_targets.json) into dm_targets.json and the tables of
    dm_targets_tables.md, one section per preset; ``names`` are the variant names (for :func:`clean_command`)."""
    parts = [q for p in paths for q in as_parts(json.loads(p.read_text()))]
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for p in parts:
        by_preset.setdefault(p["preset"], []).append(p)
    merged = {name: merge(ps, names) for name, ps in by_preset.items()}
    (out / "dm_targets.json").write_text(json.dumps(merged, indent=1))
    text = "\n".join(report(r, cmd) for r in merged.values())
    (out / "dm_targets_tables.md").write_text(text)
    return text
