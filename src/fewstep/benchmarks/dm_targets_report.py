r"""Report of :mod:`fewstep.benchmarks.dm_targets`: merge per-process JSON files, write dm_targets.md/.json.

Every number is a mean over seeds with a 95 % t-interval, :math:`\bar x \pm t_{0.975,n-1}\,s/\sqrt n`. The
target a student lands on is decided per (variant, w, NFE) from paired per-seed differences: with targets sorted by
mean MMD², the nearest one is named when the 95 % interval of (second − nearest) excludes 0, else the row reads
"tie a/b".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

__all__ = ["TARGETS", "NFES", "ci95", "nearest_target", "merge", "report", "merge_and_report"]

TARGETS: tuple[str, ...] = ("guided_ode", "tilted", "mixture")  #: the three targets of fewstep.benchmarks.dm_targets
NFES: tuple[int, ...] = (1, 2, 4)  #: student step counts scored

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


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of several runs' JSON (same preset): separations and students by w and seed."""
    res = {
        **parts[0],
        "commands": [c for p in parts for c in p["commands"]],
        "separation": {},
        "students": {},
        "runs": {},
    }
    res["teacher"] = {}
    for p in parts:  # separations by sample size n, then w
        for w, per in p["separation"].items():
            res["separation"].setdefault(str(p["n"]), {}).setdefault(w, {}).update(per)
        for w, per in p.get("teacher", {}).items():
            res["teacher"].setdefault(w, {}).update(per)
        for name, by_w in p["students"].items():
            for w, per in by_w.items():
                res["students"].setdefault(name, {}).setdefault(w, {}).update(per)
                res["runs"][name] = p["run"]
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
        run = next(iter(res["runs"].values()))
        lines += [
            "",
            "### Students: MMD² to each target (mean ± 95 % CI) and the nearest target",
            "",
            f"Run settings (every variant): {run}; teacher init {res['pretrain_steps']} flow-matching steps; "
            f"EMA 0.99 student; {res['student_n']} samples, the targets' labels.",
            "",
            "| w | student | NFE | seeds | to guided ODE | to tilted | to w=1 mixture | nearest |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ws = sorted({w for by_w in res["students"].values() for w in by_w}, key=float)
        seps = res["separation"].get(str(res["student_n"]), {})
        pairs = [f"{a} vs {b}" for i, a in enumerate(TARGETS) for b in TARGETS[i + 1 :]]
        gaps = {w: min(sum(r[k] for r in per.values()) / len(per) for k in pairs) for w, per in seps.items()}
        for w in ws:
            for name, by_w in res["students"].items():
                if w not in by_w:
                    continue
                recs = list(by_w[w].values())
                for k in NFES:
                    per_seed = [r["metrics"][str(k)] for r in recs]
                    if any(not math.isfinite(v) for r in per_seed for v in r.values()):
                        lines.append(f"| {w} | {name} | {k} | {len(recs)} | diverged (non-finite samples) | | | |")
                        continue
                    lines.append(
                        f"| {w} | {name} | {k} | {len(recs)} | "
                        + " | ".join(fmt([r[t] for r in per_seed]) for t in TARGETS)
                        + f" | {nearest_target(per_seed, gaps.get(w))} |"
                    )
    return "\n".join(lines) + "\n"


def merge_and_report(paths: list[Path], out: Path, cmd: str) -> str:
    """Merge JSON files (grouped by preset) into dm_targets.json and the tables of dm_targets_tables.md."""
    parts = [json.loads(p.read_text()) for p in paths]
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for p in parts:
        by_preset.setdefault(p["preset"], []).append(p)
    merged = {name: merge(ps) for name, ps in by_preset.items()}
    (out / "dm_targets.json").write_text(json.dumps(merged, indent=1))
    text = "\n".join(report(r, cmd) for r in merged.values())
    (out / "dm_targets_tables.md").write_text(text)
    return text
