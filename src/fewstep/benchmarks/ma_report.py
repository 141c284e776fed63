"""Markdown tables of the MA experiments (:mod:`fewstep.benchmarks.ma_experiments`): per-arm metrics with 95 %
t-intervals over seeds, seed-paired MA-vs-baseline comparisons at equal steps and equal CPU time, claim (i) pairs
of trained students, and the telescoping TV bound as a diagnostic (vacuous rows, Spearman ρ with Σε_k).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.ma_eval import evaluate_student, load_student
from fewstep.benchmarks.ma_stats import LOWER_IS_BETTER, claim_i_pairs, metric, paired, spearman_ci, t_interval

__all__ = ["write_report", "render", "arm_groups", "ci_cell", "compare", "tally"]

NFES = (1, 2, 4)


def arm_groups(res: dict[str, Any]) -> dict[tuple[str, str, str], dict[int, dict[str, Any]]]:
    """(target, method, arm) -> {seed: run}."""
    out: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for key, run in res["runs"].items():
        tag, method, arm, seed = key.split("/")
        out.setdefault((tag, method, arm), {})[int(seed)] = run
    return out


def _kl_tv_names(runs: dict[int, dict[str, Any]]) -> tuple[str, str]:
    """Density-free KL/TV when measured, else the importance-sampled ones (valid only without folds)."""
    ev = next(iter(runs.values()))["eval"]
    first = ev.get("1", ev.get(1, {}))
    return ("kl_knn", "tv_knn") if "kl_knn" in first else ("kl_is", "tv_is")


def ci_cell(vals: list[float | None], fmt: str = ".3g") -> str:
    m, hw, n = t_interval([v for v in vals if v is not None])
    return "–" if n == 0 else f"{m:{fmt}} ± {hw:.2g}"


def _by_seed(runs: dict[int, dict[str, Any]], name: str, nfe: int) -> dict[int, float]:
    return {s: v for s, r in runs.items() if (v := metric(r, name, nfe)) is not None}


def arm_table(groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]], tag: str) -> list[str]:
    """Per-arm metrics of one target (mean ± 95 % half-width over seeds)."""
    lines = [
        "| arm | steps | CPU ms/step | NFE | MMD² | KL | TV | mean log p₀ | fold | E_q[p/q] | held-out FM loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (t, _, arm), runs in groups.items():
        if t != tag:
            continue
        kl, tv = _kl_tv_names(runs)
        steps = next(iter(runs.values()))["steps"]
        ms = ci_cell([1e3 * r["cpu_s_per_step"] for r in runs.values()], ".3g")
        for k in NFES:
            col = [ci_cell(list(_by_seed(runs, m, k).values())) for m in ("mmd2", kl, tv, "loglik", "fold", "eq_ratio")]
            fm = ci_cell([r["fm_loss"] for r in runs.values()], ".4g") if k == 1 else ""
            lines.append(f"| {arm} | {steps} | {ms if k == 1 else ''} | {k} | " + " | ".join(col) + f" | {fm} |")
    return lines


def _diff_cell(p: dict[str, Any], relative: bool) -> str:
    """'-12 % ± 8 % better' (relative to the baseline mean) or '+0.31 ± 0.2 tie' (absolute)."""
    if relative and p["base"] and math.isfinite(p["base"]):
        return f"{100 * p['rel']:+.3g} % ± {100 * p['hw'] / abs(p['base']):.2g} % {p['verdict']}"
    return f"{p['diff']:+.3g} ± {p['hw']:.2g} {p['verdict']}"


def compare(
    groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]],
    tag: str,
    metrics: tuple[str, ...] = ("mmd2", "KL", "TV", "loglik"),
    nfes: tuple[int, ...] = NFES,
) -> tuple[list[str], list[dict[str, Any]]]:
    """MA arms vs base@N (equal steps), vs the equal-CPU baseline and (2-rectified flow) vs the round-1 student
    they start from, seed-paired; table lines and records."""
    r1 = any(t == tag and arm == "round1" for t, _, arm in groups)
    matches = ["steps", "CPU", *(["round1"] if r1 else [])]
    lines = [
        "| MA arm | NFE | " + " | ".join(f"{m} ={match}" for m in metrics for match in matches) + " |",
        "|---|---|" + "---|" * len(matches) * len(metrics),
    ]
    recs = []
    for (t, method, arm), runs in groups.items():
        if t != tag or not arm.startswith("MA"):
            continue
        bases = {
            "steps": groups.get((t, method, "base@N")),
            "CPU": groups.get((t, method, "base@cpu" if arm.endswith("start") else "base@cpu-mid")),
            **({"round1": groups.get((t, method, "round1"))} if r1 else {}),
        }
        kl, tv = _kl_tv_names(runs)
        for k in nfes:
            cells = []
            for m in metrics:
                name = {"KL": kl, "TV": tv}.get(m, m)
                for match, base in bases.items():
                    if not base:
                        cells.append("–")
                        continue
                    p = paired(_by_seed(runs, name, k), _by_seed(base, name, k), LOWER_IS_BETTER[name])
                    if not p["n"]:  # not measured for this target (the TV bound above 16-D)
                        cells.append("–")
                        continue
                    recs.append({"target": t, "arm": arm, "nfe": k, "metric": name, "match": match, **p})
                    cells.append(_diff_cell(p, relative=name != "loglik"))
            lines.append(f"| {arm} | {k} | " + " | ".join(cells) + " |")
    return lines, recs


def claim_i(res: dict[str, Any], tag: str, draws: int = 6, nfes: tuple[int, ...] = (1, 4)) -> dict[str, Any] | None:
    """The trained pair of ``tag`` with matched held-out FM loss and the largest 1-NFE MMD² gap, re-measured on
    ``draws`` fresh noise/reference draws shared by both students (mean ± SE per student and of the paired
    difference b − a, per NFE in ``nfes``); None when the cached students are missing or no pair matches."""

    runs = {k: r for k, r in res["runs"].items() if k.startswith(tag + "/") and Path(r["student_file"]).is_file()}
    if len(runs) < 2:
        return None
    saved = {k: torch.load(r["student_file"], weights_only=True) for k, r in runs.items()}
    # students saved without their per-pair losses (the round-1 files of early reflow2 sweeps) are left out
    losses = {k: f["fm_rows"] for k, f in saved.items() if "fm_rows" in f}
    score = {k: float(metric(r, "mmd2", 1)) for k, r in runs.items() if k in losses}
    pairs = claim_i_pairs(losses, score, top=len(losses))
    if not pairs:
        return {"n_students": len(losses), "n_matched": 0}
    best = {**pairs[0], "n_students": len(losses), "n_matched": len(pairs)}
    evs: dict[str, list[dict[int, dict[str, float]]]] = {}
    knn_dim = int(res.get("settings", {}).get("knn_max_dim", 3))  # k-NN KL/TV up to the sweep's dimension
    for side in ("a", "b"):
        st, teacher = load_student(runs[best[side]])
        evs[side] = [
            evaluate_student(st, teacher, n=2000, seed=100 + i, nfe=nfes, density_max_dim=0, knn_max_dim=knn_dim)
            for i in range(draws)
        ]

    def mse(v: list[float]) -> tuple[float, float]:
        t = torch.tensor(v, dtype=torch.float64)
        return float(t.mean()), float(t.std() / math.sqrt(len(v)))

    for k in nfes:
        for m in ("mmd2", "kl_knn", "tv_knn", "loglik"):
            va, vb = ([e[k][m] for e in evs[side] if m in e[k]] for side in ("a", "b"))
            if not va:
                continue
            sfx = "" if k == 1 else f"@{k}"
            best[f"{m}{sfx}_a"], best[f"{m}{sfx}_a_se"] = mse(va)
            best[f"{m}{sfx}_b"], best[f"{m}{sfx}_b_se"] = mse(vb)
            best[f"{m}{sfx}_diff"], best[f"{m}{sfx}_diff_se"] = mse([b - a for a, b in zip(va, vb, strict=True)])
    return best


def claim_i_lines(ci: dict[str, Any]) -> list[str]:
    """Markdown of one claim (i) record (:func:`claim_i`)."""
    head = [
        "### Claim (i): matched pair loss, different marginals",
        "",
        f"{ci['n_matched']} of the {ci['n_students'] * (ci['n_students'] - 1) // 2} pairs of the "
        f"{ci['n_students']} cached students have held-out FM losses within one paired SE.",
        "",
    ]
    if not ci["n_matched"]:
        return head
    cols = [(m, sfx) for sfx in ("", "@4") for m in ("mmd2", "kl_knn", "tv_knn", "loglik") if f"{m}{sfx}_a" in ci]

    def pm(key: str) -> str:
        return f"{ci[key]:.4g} ± {ci[key + '_se']:.2g}" if key in ci else "–"

    lines = [
        *head,
        "| student | held-out FM loss | " + " | ".join(f"{m} ({sfx[1:] or 1} NFE)" for m, sfx in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for side in ("a", "b"):
        lines.append(
            f"| {ci[side]} | {ci['loss_' + side]:.5f} | " + " | ".join(pm(f"{m}{s}_{side}") for m, s in cols) + " |"
        )
    lines.append(
        "| b − a (paired over draws) | "
        + f"{-ci['dloss']:+.2e} ± {ci['dloss_se']:.1e} | "
        + " | ".join(pm(f"{m}{s}_diff") for m, s in cols)
        + " |"
    )
    return [*lines, "", "Means ± SE over 6 fresh draws of 2000 noise and reference samples (seeds 100-105).", ""]


def _finite(bound: dict[str, Any]) -> bool:
    return all(bound.get(f) is not None and math.isfinite(float(bound[f])) for f in ("sum_eps", "tv_final"))


def tv_section(res: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Vacuous rows, Spearman ρ(Σε_k, final TV) with bootstrap intervals, per target and pooled."""
    every = [(k.split("/")[0], r["tv_bound"], r) for k, r in res["runs"].items() if "tv_bound" in r]
    # a folding 4-NFE map has no change-of-variables TV (NaN): those students are counted, not ranked
    rows = [(t, b, r) for t, b, r in every if _finite(b)]
    if not rows:
        return [], {}
    lines = [
        "| target | students | vacuous (Σε ≥ 1) | median Σε | median TV final | ρ(Σε, TV final) [95 % CI] | "
        "ρ(Σε, density-free TV 4 NFE) [95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    out: dict[str, Any] = {}
    for tag in [*dict.fromkeys(t for t, _, _ in rows), "all"]:
        sel = [(b, r) for t, b, r in rows if tag in ("all", t)]
        se = [b["sum_eps"] for b, _ in sel]
        tv = [b["tv_final"] for b, _ in sel]
        s1 = spearman_ci(se, tv) if len(sel) > 3 else None
        hist = [(b["sum_eps"], metric(r, "tv_knn", 4)) for b, r in sel if metric(r, "tv_knn", 4) is not None]
        s2 = spearman_ci(*zip(*hist, strict=True)) if len(hist) > 3 else None
        vac = sum(v >= 1 for v in se)
        dropped = sum(tag in ("all", t) for t, _, _ in every) - len(sel)
        folded = f" (+{dropped} folded: no TV)" if dropped else ""
        out[tag] = {"n": len(sel), "vacuous": vac, "rho": s1, "rho_hist": s2}

        def fmt(s: dict[str, float] | None) -> str:
            return "–" if s is None else f"{s['rho']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]"

        lines.append(
            f"| {tag} | {len(sel)}{folded} | {vac} | {sorted(se)[len(se) // 2]:.3f} | {sorted(tv)[len(tv) // 2]:.3f} "
            f"| {fmt(s1)} | {fmt(s2)} |"
        )
    return lines, out


def tally(recs: list[dict[str, Any]]) -> list[str]:
    """Counts of better/worse/tie per (metric, matching) and the list of MA wins."""
    lines = ["| metric | matching | better | worse | tie |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["metric"], r["match"]) for r in recs))
    for m, match in keys:
        sel = [r for r in recs if r["metric"] == m and r["match"] == match]
        c = {v: sum(r["verdict"] == v for r in sel) for v in ("better", "worse", "tie")}
        lines.append(f"| {m} | {match} | {c['better']} | {c['worse']} | {c['tie']} |")
    wins = [r for r in recs if r["verdict"] == "better"]
    lines += ["", "MA better (95 % interval of the seed-paired difference excludes 0):", ""]
    lines += [
        f"- {r['target']}, {r['arm']}, {r['nfe']} NFE, {r['metric']} (={r['match']}): "
        f"{r['diff']:+.4g} ± {r['hw']:.2g} (baseline {r['base']:.4g})"
        for r in wins
    ] or ["- none"]
    return lines


def render(res: dict[str, Any], with_claim_i: bool = True) -> tuple[str, dict[str, Any]]:
    """The markdown tables and the computed summary records."""
    groups = arm_groups(res)
    st = res["settings"]
    lines = [
        "# MA experiments: tables (generated)",
        "",
        "Generated by `python -m fewstep.benchmarks.ma_experiments report ...` from the sweep JSON; settings: "
        f"`{json.dumps(st, ensure_ascii=False)}`; cost ratios r (CPU time of an MA step / plain step): "
        f"`{json.dumps(res.get('ratio', {}))}`.",
        "",
        "Intervals are 95 % t-intervals over seeds; comparisons are seed-paired differences MA − baseline "
        "(relative to the baseline mean), `tie` when the interval contains 0.",
        "",
    ]
    summary: dict[str, Any] = {"compare": [], "claim_i": {}, "tv": {}}
    for tag in dict.fromkeys(t for t, _, _ in groups):
        lines += [f"## {tag}", "", "### Arms", "", *arm_table(groups, tag), "", "### MA vs baselines", ""]
        cl, recs = compare(groups, tag)
        summary["compare"] += recs
        lines += [*cl, ""]
        ci = claim_i(res, tag) if with_claim_i else None
        if ci is not None:
            summary["claim_i"][tag] = ci
            lines += claim_i_lines(ci)
    lines += [
        "## Tally over all targets",
        "",
        *tally(summary["compare"]),
        "",
        "## Telescoping bound TV(q₀, p₀) ≤ Σε_k (4 windows, 4-NFE sampler)",
        "",
    ]
    tl, summary["tv"] = tv_section(res)
    lines += [*tl, "", "Does MA lower Σε_k and the final TV (4 windows, 4 NFE)? Seed-paired MA − baseline:", ""]
    for tag in dict.fromkeys(t for t, _, _ in groups):
        cl, recs = compare(groups, tag, metrics=("sum_eps", "tv_final"), nfes=(4,))
        summary["tv"].setdefault("compare", []).extend(recs)
        lines += [f"**{tag}**", "", *cl, ""]
    return "\n".join(lines) + "\n", summary


def write_report(files: list[Path], out: Path, renderer: Callable[..., tuple[str, dict[str, Any]]] = render) -> None:
    """Merge sweep JSON files and write ``out`` (markdown by ``renderer``) and ``out`` with suffix ``.summary.json``."""
    res: dict[str, Any] = {"runs": {}, "ratio": {}, "settings": {}, "floor": {}}
    for f in files:
        part = json.loads(f.read_text())
        for k in ("runs", "ratio", "floor"):
            res[k].update(part.get(k, {}))
        res["settings"] = part.get("settings", res["settings"])
    text, summary = renderer(res)
    out.write_text(text)
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1, default=float))
