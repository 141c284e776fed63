r"""Which guidance does each distribution-matching student inherit on the learned image teacher (issue 16 item 3)?

Targets of a CFG-distilled student of the class-conditional digits8 teacher at weight w:

* **guided ODE**: the endpoint of :math:`\dot x = v_u + w (v_c - v_u)` from t = 1 to 0 (dopri5, ``rtol``), what a
  trajectory student of the guided teacher reproduces;
* **w = 1**: the same solve without guidance, the teacher's conditional distribution.

Each target is drawn twice, from independent noise seeds ``A`` and ``B`` (balanced labels i mod 10 both times), so
FD(guided_A, guided_B) is the finite-n floor of a distance to a target and FD(guided_A, w1_B) the distance between
the targets. Students are sampled at their own NFE from the evaluation noise of
:func:`fewstep.benchmarks.image_bench.eval_noise` (seed 0, independent of A and B) and scored against draw A of
each target. Every FD is in the shipped classifier's features (:mod:`fewstep.evaluation.image_features`);
precision, recall and class accuracy are against real digits (:func:`~fewstep.evaluation.image_features.image_metrics`).

Commands (``python -m fewstep.benchmarks.image_guidance ...``; every command merges into the JSON ``--out``)::

    targets TEACHER_RUN --w 1 2 4 --out docs/results/images_guidance.json
    students RUN [RUN ...] --teacher TEACHER_RUN --variant full --out docs/results/images_guidance.json
    report --out docs/results/images_guidance.json --md docs/results/images_guidance_tables.md

The students are ``fewstep distill`` runs of the image configs with ``teacher.guidance=w`` (ddmd/cdm also
``method.cfg.guidance=w``, which their image configs pin to 1); their w and seed are read from the run's config.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.benchmarks.dm_targets_eval import run_guidance
from fewstep.benchmarks.image_bench import eval_noise, run_data_name
from fewstep.benchmarks.ma_stats import paired, t_interval
from fewstep.evaluation.image_features import FLOOR_N, frechet_image_distance, image_metrics
from fewstep.sampling.samplers import solve, solve_adaptive
from fewstep.sampling.spec import sample_with

__all__ = ["guided_target", "load_targets", "target_rows", "init_rows", "student_row", "report", "main"]

SEED_A, SEED_B = 1, 2  # noise seeds of the two target draws (the students use seed 0)


def guided_target(teacher: Any, w: float, n: int, seed: int, rtol: float = 1e-4) -> tuple[Tensor, Tensor, int]:
    """Samples of the guided teacher ODE at weight ``w`` from noise seed ``seed``: (x, labels, NFE)."""
    x1, cond = eval_noise(n, teacher.event_shape, teacher.num_classes, seed)
    with torch.no_grad():
        res = solve_adaptive(teacher.velocity, x1, rtol=rtol, atol=rtol, cond=cond, guidance=float(w))
    return res.x, cond, int(res.nfe)


def load_targets(teacher_run: str | Path, ws: Sequence[float], n: int, rtol: float = 1e-4,
                 cache: str | Path | None = None) -> dict[tuple[float, int], dict[str, Any]]:
    """Draws A and B of the guided target at every w (and w = 1), cached as .pt files in ``cache``."""
    from fewstep.config.build import build_teacher
    from fewstep.config.schema import TeacherConfig

    teacher = build_teacher(TeacherConfig(kind="run", path=str(teacher_run)))
    out: dict[tuple[float, int], dict[str, Any]] = {}
    for w in sorted({1.0, *map(float, ws)}):
        for seed in (SEED_A, SEED_B):
            f = Path(cache) / f"target_w{w:g}_seed{seed}_n{n}_rtol{rtol:g}.pt" if cache else None
            if f is not None and f.exists():
                out[(w, seed)] = torch.load(f, weights_only=True)
                continue
            x, cond, nfe = guided_target(teacher, w, n, seed, rtol)
            out[(w, seed)] = {"x": x, "cond": cond, "nfe": nfe}
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                torch.save(out[(w, seed)], f)
    return out


def target_rows(name: str, targets: dict[tuple[float, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per w: draw A against real digits, the A-vs-B floor and the distance to the w = 1 target (draw B)."""
    rows = []
    for w in sorted({k[0] for k in targets}):
        a, b, one_b = targets[(w, SEED_A)], targets[(w, SEED_B)], targets[(1.0, SEED_B)]
        rows.append({"w": w, "nfe": a["nfe"], **image_metrics(name, a["x"], a["cond"]),
                     "fd_floor": frechet_image_distance(name, a["x"], b["x"]),
                     "fd_to_w1": frechet_image_distance(name, a["x"], one_b["x"])})
    return rows


def init_rows(teacher_run: str | Path, targets: dict[tuple[float, int], dict[str, Any]],
              steps: Sequence[int] = (1, 4)) -> list[dict[str, Any]]:
    """The students' common init: the unguided teacher's Euler k from the students' noise (seed 0), vs each target."""
    from fewstep.config.build import build_teacher
    from fewstep.config.schema import TeacherConfig

    name, teacher = run_data_name(teacher_run), build_teacher(TeacherConfig(kind="run", path=str(teacher_run)))
    x1, cond = eval_noise(targets[(1.0, SEED_A)]["x"].shape[0], teacher.event_shape, teacher.num_classes, 0)
    rows = []
    for k in steps:
        with torch.no_grad():
            x = solve(teacher.velocity, x1, int(k), method="euler", cond=cond).x
        rows.append({"nfe": int(k), **image_metrics(name, x, cond),
                     **{f"fd_w{w:g}": frechet_image_distance(name, x, targets[(w, SEED_A)]["x"])
                        for w in sorted({key[0] for key in targets})}})
    return rows


def student_row(run_dir: str | Path, targets: dict[tuple[float, int], dict[str, Any]], variant: str = "full",
                nfe: int | None = None, n: int | None = None) -> dict[str, Any]:
    """One student at its own NFE (the method's ``n_steps``): FD to both targets and to the guided ODE at every
    computed w (``fd_to``; draw A), and the real-data metrics."""
    from fewstep.config.build import load_run

    run = load_run(run_dir)
    name, w = run.config.data.name, run_guidance(run.config)
    if (w, SEED_A) not in targets:
        raise ValueError(f"{run_dir}: no target at w = {w:g}; compute it with `targets --w {w:g}`")
    student = run.student(ema=True)
    k = int(nfe or dict(run.config.method.cfg).get("n_steps", 1))
    x1, cond = eval_noise(int(n or FLOOR_N[name]), student.net.event_shape, student.net.num_classes, 0)
    with torch.no_grad():
        x = sample_with(student, x1, run.sampler, nfe=k, cond=cond, seed=0).x
    return {"run": str(run_dir), "method": run.config.method.name, "variant": variant, "w": w,
            "seed": int(run.config.seed), "steps": run.step, "nfe": k, **image_metrics(name, x, cond),
            "fd_guided": frechet_image_distance(name, x, targets[(w, SEED_A)]["x"]),
            "fd_w1": frechet_image_distance(name, x, targets[(1.0, SEED_A)]["x"]),
            "fd_to": {f"{v:g}": frechet_image_distance(name, x, t["x"]) for (v, sd), t in sorted(targets.items())
                      if sd == SEED_A}}


def _ci(vals: Sequence[float], fmt: str = ".2f") -> str:
    m, hw, k = t_interval(vals)
    return f"{m:{fmt}}" if k < 2 else f"{m:{fmt}} ± {hw:{fmt}}"


def _verdict(d: dict[str, Any], lower: str, higher: str) -> str:
    if d["n"] < 2 or abs(d["diff"]) <= d["hw"]:
        return "tie" if d["n"] >= 2 else f"({lower if d['diff'] < 0 else higher}, 1 seed)"
    return lower if d["diff"] < 0 else higher


def report(data: dict[str, Any], base: str = "full") -> str:
    """Markdown tables: targets, students per (method, w) against both targets, CDM variants against ``base``."""
    lines = ["### Targets (draw A; floor = FD(A, B) of the same target)", "",
             "| w | NFE | FD to real | precision | recall | class acc | FD floor (A vs B) | FD to w = 1 target (B) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data.get("targets", []):
        lines.append(f"| {r['w']:g} | {r['nfe']} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_acc']:.3f} | {r['fd_floor']:.2f} | {r['fd_to_w1']:.2f} |")
    ws = [r["w"] for r in data.get("targets", [])]
    lines += ["", "### The students' init: the unguided teacher, Euler k from the students' noise", "",
              "| Euler steps | FD to real | precision | recall | class acc | "
              + " | ".join(f"FD to guided ODE w = {w:g}" for w in ws) + " |", "|---" * (5 + len(ws)) + "|"]
    for r in data.get("init", []):
        lines.append(f"| {r['nfe']} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_acc']:.3f} | " + " | ".join(f"{r[f'fd_w{w:g}']:.2f}" for w in ws) + " |")
    groups: dict[tuple[str, str, float], dict[int, dict[str, Any]]] = {}
    for r in data.get("students", {}).values():
        groups.setdefault((r["method"], r["variant"], r["w"]), {})[r["seed"]] = r
    lines += ["", "### Students at their own NFE (mean ± 95 % t-interval over training seeds)", "",
              "| method | variant | w | NFE | seeds | FD to guided ODE | FD to w = 1 | guided − w=1 (paired) | nearer |"
              " FD to real | precision | recall | class acc |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, v, w), rs in sorted(groups.items()):
        g = {s: r["fd_guided"] for s, r in rs.items()}
        d = paired(g, {s: r["fd_w1"] for s, r in rs.items()})
        near = "same target (w = 1)" if w == 1 else _verdict(d, "guided ODE", "w = 1")
        diff = "-" if w == 1 else _ci([g[s] - rs[s]["fd_w1"] for s in sorted(rs)])
        lines.append(f"| {m} | {v} | {w:g} | {next(iter(rs.values()))['nfe']} | {len(rs)} | {_ci(list(g.values()))} | "
                     f"{_ci([r['fd_w1'] for r in rs.values()])} | {diff} | {near} | "
                     + " | ".join(_ci([r[k] for r in rs.values()], f) for k, f in
                                  (("fd", ".2f"), ("precision", ".3f"), ("recall", ".3f"), ("class_acc", ".3f")))
                     + " |")
    lines += ["", "### FD to the guided ODE at each w' (mean over seeds; nearest in bold)", "",
              "| method | variant | trained at w | " + " | ".join(f"w' = {w:g}" for w in ws) + " |",
              "|---" * (3 + len(ws)) + "|"]
    for (m, v, w), rs in sorted(groups.items()):
        if not all("fd_to" in r for r in rs.values()):
            continue
        means = {u: statistics.fmean(r["fd_to"][f"{u:g}"] for r in rs.values()) for u in ws}
        best = min(means, key=means.__getitem__)
        lines.append(f"| {m} | {v} | {w:g} | " + " | ".join(
            f"**{means[u]:.1f}**" if u == best else f"{means[u]:.1f}" for u in ws) + " |")
    lines += ["", f"### Variants against `{base}` (same method and w; paired by seed, variant − {base})", "",
              "| method | w | variant | seeds | Δ FD to guided ODE | verdict | Δ class acc | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for (m, v, w), rs in sorted(groups.items()):
        ref = groups.get((m, base, w))
        if v == base or ref is None:
            continue
        dfd = paired({s: r["fd_guided"] for s, r in rs.items()}, {s: r["fd_guided"] for s, r in ref.items()})
        dacc = paired({s: r["class_acc"] for s, r in rs.items()}, {s: r["class_acc"] for s, r in ref.items()},
                      lower_is_better=False)
        hw = "" if dfd["n"] < 2 else f" ± {dfd['hw']:.2f}"
        hwa = "" if dacc["n"] < 2 else f" ± {dacc['hw']:.3f}"
        lines.append(f"| {m} | {w:g} | {v} | {dfd['n']} | {dfd['diff']:+.2f}{hw} | "
                     f"{_verdict(dfd, 'closer', 'further')} | {dacc['diff']:+.3f}{hwa} | "
                     f"{_verdict(dacc, 'lower', 'higher')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fewstep.benchmarks.image_guidance")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("targets")
    t.add_argument("teacher")
    t.add_argument("--w", type=float, nargs="+", default=[1.0, 2.0])
    s = sub.add_parser("students")
    s.add_argument("runs", nargs="+")
    s.add_argument("--teacher", required=True)
    s.add_argument("--variant", default="full")
    s.add_argument("--nfe", type=int, default=None, help="default: the method's n_steps")
    r = sub.add_parser("report")
    r.add_argument("--md", required=True)
    for q in (t, s):
        q.add_argument("--n", type=int, default=None)
        q.add_argument("--rtol", type=float, default=1e-4)
        q.add_argument("--cache", default="runs/images_guidance/targets")
    for q in (t, s, r):
        q.add_argument("--out", required=True, help="JSON, merged into")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if a.cmd == "report":
        text = report(data)
        Path(a.md).write_text(text)
        print(text)
        return 0
    teacher_name = run_data_name(a.teacher)
    n = int(a.n or FLOOR_N[teacher_name])
    if a.cmd == "targets":
        targets = load_targets(a.teacher, a.w, n, a.rtol, a.cache)
        data["targets"] = target_rows(teacher_name, targets)
        data["init"] = init_rows(a.teacher, targets)
        data["target_setup"] = {"teacher": a.teacher, "n": n, "rtol": a.rtol, "seeds": [SEED_A, SEED_B]}
    else:
        targets = load_targets(a.teacher, [float(w["w"]) for w in data.get("targets", [])] or [1.0], n, a.rtol,
                               a.cache)
        students = data.setdefault("students", {})
        for run in a.runs:
            row = student_row(run, targets, a.variant, a.nfe, n)
            students[run] = row
            print(json.dumps(row))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
