"""The generated leaderboard: markdown from the :func:`~fewstep.benchmarks.leaderboard.summary.collect` dict."""

from __future__ import annotations

from typing import Any

from fewstep.benchmarks.leaderboard.targets import STUDENT_NFE

__all__ = ["markdown"]


def _f(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _init(init: dict[str, Any] | None) -> str:
    """The Cost table's init entry: ``+ <steps> <method> steps, <net> / <teacher>``, or ``–`` without an init."""
    if not init:
        return "–"
    return (
        f"+ {init['steps']:.0f} {init['method']} steps, {_f(init['net_evals_per_sample'], 1)} / "
        f"{_f(init['teacher_evals_per_sample'], 1)}"
    )


def _cell(ent: dict[str, Any] | None, limit: str | None, key: str = "mmd2") -> str:
    """``mean ± std`` (the value alone for one seed) with a mark: ✓ beats the 4K Euler bar, ✗ misses it, (design) for
    a by-design miss.

    The mark of an FD entry compares its mean with the bar's FD.
    """
    if ent is None:
        return "pending"
    one = len(ent.get("seeds", ())) == 1
    s = f"{ent[key]:.4f}" if one else f"{ent[key]:.4f} ± {ent[key + '_std']:.4f}"
    ok = ent["pass"]["4"] if key == "mmd2" else ent.get("pass_" + key, {}).get("4")
    if ok is None:
        return s
    mark = "✓" if ok else ("✗ (by design)" if limit else "✗")
    return f"{s} {mark}"


def _budget_line(d: dict[str, Any]) -> str:
    b = d["budget"]
    return (
        f"Budget (equal for every method): student MLP hidden {b.get('hidden')} × depth {b.get('depth')}, "
        f"{b.get('steps')} training steps × batch {b.get('batch_size')}; everything else (method "
        "hyper-parameters, lr and schedule, EMA, time embedding) from the method's shipped "
        f"`configs/<method>.yaml`. Evaluation: {b.get('n')} samples of the EMA student with its own sampler "
        f"vs {b.get('n')} exact mixture samples (on a learned target: every held-out real digit); {b.get('probes')} "
        "evaluations during training time the bars.\n\n"
        "Equal budget here means the same number of optimiser steps and training samples (steps × batch) and the "
        "same student network, not the same wall time or the same number of network evaluations: a step of "
        "DMD2 or CDM costs several flow-matching steps. The cost that differs is reported beside the quality: "
        "training time per step relative to flow matching (× FM, the per-step cost ratio) and network / "
        "teacher evaluations per training sample and step (the Cost table), and the time to reach each bar."
    )


def _provenance(d: dict[str, Any]) -> list[str]:
    """Where the cells come from: hosts (timings are compared only within one), imported records, stale entries."""
    L = ["Cells per host (ms/step and × FM compare cells of one host only):", ""]
    L += [f"- {h}: {n}" for h, n in d.get("hosts", {}).items()]
    if d.get("imported"):
        L += [
            "",
            f"{d['imported']} cells are imported from an earlier run ({'; '.join(d['imported_from'])}): their "
            "MMD² entries and step time only (no time to bar, throughput or evaluation counts); multi-step "
            "entries of gamma > 0 samplers computed before the re-noise seed fix are dropped and listed as stale.",
        ]
    return L + [""]


def _target_table(d: dict[str, Any], target: str) -> list[str]:
    info = d["targets"][target]
    rows = [r for r in d["rows"] if r["target"] == target]
    if not rows:
        return []
    fd = any("fd" in e for r in rows for e in r["nfe"].values())
    head = f"### {target} (d = {info['dim']}, {info['components']} components)"
    if "floor" in info:
        head = f"### {target} (learned teacher, d = {info['dim']}; reference: {info['reference']})"
    lines = [
        head,
        "",
        "| method | seeds | "
        + " | ".join(f"{k} NFE MMD²" for k in STUDENT_NFE)
        + (" | " + " | ".join(f"{k} NFE FD" for k in STUDENT_NFE) if fd else "")
        + " | × FM step |",
        "|---|---|" + "---|" * (len(STUDENT_NFE) * (2 if fd else 1)) + "---|",
    ]
    for r in rows:
        cols = [_cell(r["nfe"].get(str(k)), r["design_limits"].get(str(k))) for k in STUDENT_NFE]
        if fd:
            cols += [_cell(r["nfe"].get(str(k)), r["design_limits"].get(str(k)), "fd") for k in STUDENT_NFE]
        lines.append(f"| {r['method']} | {len(r['seeds'])} | " + " | ".join(cols) + f" | {_f(r['step_vs_fm'], 2)} |")
    eu = info["euler"]
    for mult in (4, 8, 16):
        cols = [_f(eu.get(str(mult * k), {}).get("mmd2")) for k in STUDENT_NFE]
        if fd:
            cols += [_f(eu.get(str(mult * k), {}).get("fd")) for k in STUDENT_NFE]
        lines.append(f"| *teacher Euler {mult}× NFE* | | " + " | ".join(cols) + " | |")
    for key, label in (("teacher_ode", "teacher ODE (dopri5) vs real"), ("real_train", "real train vs real test")):
        ent = info.get("floor", {}).get(key)
        if ent:
            nfe = f", {ent['nfe']:.0f} NFE" if "nfe" in ent else ""
            cols = [_f(ent["mmd2"])] * len(STUDENT_NFE) + ([_f(ent.get("fd"))] * len(STUDENT_NFE) if fd else [])
            lines.append(f"| *floor: {label}{nfe}* | | " + " | ".join(cols) + " | |")
    if "floor" in info:
        lines += [
            "",
            f"Teacher: `{info['teacher']}` (the run folder `fewstep train-teacher` wrote; keyed by the config hash). "
            "Bars and floors use the same noise and the same held-out real digits as the students.",
        ]
    return lines + [""]


def markdown(d: dict[str, Any], figure: str | None = None, figure_note: str = "", page_command: str = "") -> str:
    """The whole leaderboard page.

    Args:
        d: The dict of :func:`~fewstep.benchmarks.leaderboard.summary.collect`.
        figure: File name of the quality-vs-NFE figure next to the page, or None.
        figure_note: Why there is no figure (e.g. matplotlib missing).
        page_command: The command that wrote this page (when it differs from the cell commands).

    Returns:
        Markdown text.
    """
    L = [
        "# Leaderboard",
        "",
        "Generated by `fewstep bench` (fewstep.benchmarks.leaderboard) from the stored cells "
        "(one metrics JSON per cell); "
        "do not edit by hand. Commands that produced the cells:",
        "",
    ]
    L += [f"    {c}" for c in d["commands"]] + [""]
    if page_command:
        L += ["This page was written by:", "", f"    {page_command}", ""]
    L += [_budget_line(d), ""] + _provenance(d)
    L += [
        "MMD²: unbiased RBF, bandwidths {0.05, 0.2, 1}·√(d/2) summed (`fewstep.evaluation.metrics.mmd2`), mean ± "
        "sample std over seeds (the value alone with one seed: then a margin below the estimator noise, about 1e-3 "
        "at these sample sizes, is a tie). The bar of K NFE is the teacher's own Euler sampler at 4K steps on the same "
        "noise (✓ = mean below it; FD columns, on the 64-D digits targets, are marked against the bar's FD); 8K "
        "and 16K are stricter bars. Teacher and data: the target's unconditional "
        "analytic mixture (configs tuned on the guided conditional ring8, the DMD family, run unguided here); on "
        "a learned target (`learned-digits`) a velocity network trained by `fewstep train-teacher --config "
        "configs/teacher_digits_bench.yaml` on sklearn's real 8×8 digits (train split), distilled as "
        "`teacher.kind=run` with the real train digits as data and scored against the held-out test digits "
        "(MMD² and FD in the digit-classifier features; floors: the teacher's own accurate ODE and real train "
        "digits). "
        "× FM step: training wall time per step relative to flow_matching on the same target and seed "
        "(shared CPU: noisy). A method that declares an init (`Method.needs_init`: the DM family, as its papers "
        "start the generator from the teacher) starts from a flow-matching run at the same budget "
        "(`student.init_from`): its cells cost the init's steps plus their own, and time to bar counts the "
        "init's training (budget notes).",
        "",
    ]
    ms = d["methods_summary"]
    rand = [t for t, i in d["targets"].items() if i["random"]]
    if rand:
        L += [
            f"## Random mixtures: bar pass counts ({len(rand)} mixtures: {', '.join(rand)})",
            "",
            "Mixtures drawn from a seed (`fewstep.teachers.random_mixtures`: d 2-16, 3-10 full-covariance "
            "components, unequal weights); no config was tuned on them, and none was changed for them.",
            "",
            "Entries are passed / mixtures with a valid result at that NFE (the missing ones are listed at the end).",
            "",
            "| method | sampler | 1 NFE < Euler 4 | 2 NFE < Euler 8 | 4 NFE < Euler 16 | by design; budget |",
            "|---|---|---|---|---|---|",
        ]
        for m, s in ms.items():
            rp = s["random_pass"]
            if not rp["1"]["of"]:
                continue
            cols = [f"{rp[str(k)]['passed']}/{rp[str(k)]['of']}" for k in STUDENT_NFE]
            notes = "; ".join([f"{k} NFE: {v}" for k, v in s["design_limits"].items()] + s.get("budget_notes", []))
            L.append(f"| {m} | {s['sampler']} | " + " | ".join(cols) + f" | {notes} |")
        L.append("")
    L += [
        "## Cost",
        "",
        "Medians over the cells of the method computed by this code (imported cells carry no timings). "
        "Evaluations per training sample and step count every "
        "row through any network of the method (student, fake score, target copies) and through the teacher; "
        "setup = teacher rows evaluated before training (e.g. reflow's pair generation). Time to bar: training "
        "(+ setup) wall time at the first evaluation that beats the Euler-4K bar (reached / cells), resolution "
        "= steps / probes. Throughput: EMA student samples per second on one CPU thread. Init (a method with "
        "`Method.needs_init`): the init run's steps and its net / teacher evaluations per training sample and "
        "step, in addition to the method's own columns (`train s` is the method's own training).",
        "",
        "| method | shipped steps × batch | ms/step | × FM | net evals/sample/step | teacher evals/sample/step "
        "| setup teacher evals | init: steps, net / teacher evals/sample/step | train s | time to 1-NFE bar "
        "| time to 2-NFE bar | samples/s at 1 / 4 NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in ms.items():
        tb = [
            f"{_f(s['time_to_bar'][k]['median_s'], 0)} s ({s['time_to_bar'][k]['reached']}/{s['time_to_bar'][k]['of']})"
            for k in ("1", "2")
        ]
        sh = s.get("shipped") or {}
        L.append(
            f"| {m} | {sh.get('steps')} × {sh.get('batch_size')} | {_f(s['step_ms'], 1)} | "
            f"{_f(s['step_vs_fm'], 2)} | {_f(s['net_evals_per_sample'], 1)} | "
            f"{_f(s['teacher_evals_per_sample'], 1)} | {_f(s['prepare_teacher_evals'], 0)} | {_init(s.get('init'))} | "
            f"{_f(s['train_s'], 0)} | {tb[0]} | {tb[1]} | {_f(s['throughput']['1'], 0)} / "
            f"{_f(s['throughput']['4'], 0)} |"
        )
    L.append("")
    if figure:
        L += ["## Quality vs NFE", "", f"![quality vs NFE]({figure})", ""]
    elif figure_note:
        L += [f"No figure: {figure_note}", ""]
    L += ["## Per target", ""]
    for t in d["targets"]:
        L += _target_table(d, t)
    L += ["## Missing, stale and failed cells", ""]
    if d["missing"]:
        L.append(f"{len(d['missing'])} requested cells are not computed yet (rerun the command to resume):")
        L.append("")
        groups: dict[tuple[str, int], list[str]] = {}
        for m, t, s in d["missing"]:
            groups.setdefault((t, s), []).append(m)
        for (t, s), ms_missing in sorted(groups.items()):
            names = "all methods" if len(ms_missing) == len(d["methods"]) else ", ".join(ms_missing)
            L.append(f"- {t} seed {s}: {names}")
    else:
        L.append("None missing.")
    if d.get("stale"):
        n = len(d["stale"])
        L += ["", f"{n} cells hold entries of an older evaluation (shown as pending; a rerun recomputes them):", ""]
        L += [f"- {c['method']}/{c['target']}/s{c['seed']}: NFE {', '.join(c['nfe'])}" for c in d["stale"]]
    for f in d["failed"]:
        L.append(f"- failed: {f['method']}/{f['target']}/s{f['seed']}: {f['error']}")
    return "\n".join(L) + "\n"
