r"""DMD-family experiments on a class-conditional analytic teacher with guidance w (writes docs/results/dmd.md/.json).

Target: the CFG-guided teacher :math:`v_u + w(v_c - v_u)`; its reference samples come from the adaptive
(dopri5) ODE solve of the guided field from independent noise; the w=1 target is the exact conditional mixture.
Metric: unbiased RBF MMD² (bandwidths 0.05/0.2/1 summed, ``fewstep.metrics.mmd2``), 2000 vs 2000 samples,
labels drawn from the class weights. Students start from a flow-matching velocity net trained on the
teacher's samples ("teacher init", as DMD initialises generator and fake score from the teacher); the fake
score starts from the same net. Experiments:

a. CFG-free finding: DM-only students vs the guided (w) and unguided (w=1) targets.
b. CDM ablations at 1/2/4 NFE: dynamic vs fixed schedule, off-trajectory on/off, Euler vs Gaussian, CA only /
   DM only / full.
c. Mode coverage of DMD-family students next to other registered distillation students.

Run: ``python -m fewstep.benchmarks.dmd_experiments [--steps 1500 --seeds 0 1 2 --out docs/results]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..build import GuidedTeacher, build_from_objects
from ..config import TrainConfig
from ..metrics import mmd2, mode_coverage
from ..methods import get_method, list_methods
from ..samplers import sample_flowmap, solve, solve_adaptive
from ..teachers.presets import load_preset
from ..trainer import Trainer

STUDENT = {"hidden": 128, "depth": 3}
NFES = (1, 2, 4)

# name -> (method, method config); "guidance" is filled in with w
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dmd2 (1-step)": ("dmd2", {"n_steps": 1}),
    "cdm (full, dynamic, euler)": ("cdm", {}),
    "cdm DM only": ("cdm", {"ca_weight": 0.0, "cdm_weight": 0.0}),
    "cdm CA only": ("cdm", {"dm_weight": 0.0, "cdm_weight": 0.0}),
    "cdm fixed schedule": ("cdm", {"schedule": "fixed"}),
    "cdm no off-trajectory": ("cdm", {"off_trajectory": False}),
    "cdm gaussian perturbation": ("cdm", {"perturbation": "gaussian"}),
    "ddmd (4-step, fixed)": ("ddmd", {}),
    "DM-only 1-step (dmd2, w=1 real)": ("dmd2", {"n_steps": 1, "guidance": 1.0}),
    "dmd (1-step, +regression)": ("dmd", {"n_steps": 1}),
    "cdm shared re-noise (CA uniform)": ("cdm", {"ca_renoise": "uniform"}),
}
OTHERS: dict[str, dict[str, Any]] = {"reflow": {"n_pairs": 8192}, "cd": {}}


def references(teacher: Any, w: float, n: int, seed: int) -> dict[str, Tensor]:
    """Labels, evaluation noise, guided-ODE reference (independent noise) and exact w=1 conditional samples."""
    g = torch.Generator().manual_seed(10_000 + seed)
    cond = teacher.sample_labels(n, generator=g)
    z_eval = torch.randn(n, *teacher.event_shape, generator=g, dtype=torch.float64)
    z_ref = torch.randn(n, *teacher.event_shape, generator=g, dtype=torch.float64)
    kw = {"guidance": w} if w != 1.0 else {}
    ref = solve_adaptive(teacher, z_ref, cond=cond, rtol=1e-6, atol=1e-6, **kw).x
    ref_w1 = teacher.sample(n, cond=cond, generator=g, dtype=torch.float64)
    floor = solve_adaptive(teacher, z_eval, cond=cond, rtol=1e-6, atol=1e-6, **kw).x
    return {"cond": cond, "z": z_eval, "ref": ref, "ref_w1": ref_w1, "adaptive": floor}


def score(x: Tensor, refs: dict[str, Tensor], teacher: Any) -> dict[str, float]:
    """MMD² to the guided and to the w=1 target, and mode coverage (per class)."""
    x = x.to(torch.float64)
    cov = mode_coverage(x, teacher, cond=refs["cond"])
    return {"mmd2": mmd2(x, refs["ref"]), "mmd2_w1": mmd2(x, refs["ref_w1"]),
            "modes_covered": float(cov["modes_covered"]), "off_mode": float(cov["off_mode"])}


def make_trainer(name: str, teacher: Any, cfg: dict[str, Any], init: dict[str, Tensor] | None, seed: int,
                 steps: int, lr: float, fake_lr: float) -> Trainer:
    """A Trainer for method ``name`` whose student (and fake score) start from ``init``."""
    method, data = build_from_objects(name, teacher, None, cfg, dict(STUDENT), seed)
    if init is not None and method.parameterization != "average_velocity":  # same backbone shapes
        method.student.net.load_state_dict(init)
        if hasattr(method, "fake"):
            method.fake.net.load_state_dict(init)
    over = {"fake": fake_lr} if "fake" in method.trainable() else {}
    tc = TrainConfig(steps=steps, batch_size=256, lr=lr, lr_overrides=over, ema_decays=[0.99], progress=False,
                     tensorboard=False, log_every=max(steps // 10, 1))
    return Trainer(method, data, tc, seed=seed)


def pretrain(teacher: Any, seed: int, steps: int, cache: Path) -> dict[str, Tensor]:
    """Teacher init: a conditional velocity MLP trained by flow matching on the teacher's exact samples (cached)."""
    path = cache / f"fm_init_{STUDENT['hidden']}x{STUDENT['depth']}_{steps}_seed{seed}.pt"
    if path.is_file():
        return torch.load(path)
    tr = make_trainer("flow_matching", teacher, {"cond_drop": 0.1}, None, seed, steps, 1e-3, 1e-3)
    tr.fit()
    state = {k: v.clone() for k, v in tr.student(ema=True).net.state_dict().items()}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def eval_student(student: Any, refs: dict[str, Tensor], teacher: Any) -> dict[str, dict[str, float]]:
    out = {}
    for k in NFES:
        with torch.no_grad():
            x = sample_flowmap(student, refs["z"].float(), k, cond=refs["cond"]).x
        out[str(k)] = score(x, refs, teacher)
    return out


def teacher_rows(teacher: Any, w: float, refs: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    out = {"adaptive (dopri5)": score(refs["adaptive"], refs, teacher)}
    kw = {"guidance": w} if w != 1.0 else {}
    for k in (1, 2, 4, 8, 16):
        out[f"euler {k}"] = score(solve(teacher, refs["z"], k, cond=refs["cond"], **kw).x, refs, teacher)
    return out


def summarise(vals: list[float]) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    return f"{float(t.mean()):.4f} ± {float(t.std()) if len(vals) > 1 else 0.0:.4f}"


def ca_dm_magnitudes(teacher: Any, w: float, init: dict[str, Tensor], n: int = 4000, n_steps: int = 4) -> list[str]:
    """RMS of the normalised CA update (α−1)Δ_CA (capped / uniform τ) and of the DM update g per anchor σ of the
    teacher-init student (fake score = the same net), as markdown rows."""
    from ..methods.dmd_common import (backward_simulate, dm_loss, dm_terms, fixed_schedule, normaliser, renoise,
                                      renoise_time, teacher_x0)

    method, _ = build_from_objects("cdm", teacher, None, {"guidance": w}, dict(STUDENT), 0)
    method.student.net.load_state_dict(init)
    method.fake.net.load_state_dict(init)
    g = torch.Generator().manual_seed(0)
    cond, z = teacher.sample_labels(n, generator=g), torch.randn(n, *teacher.event_shape, generator=g)
    rows = ["| anchor σ | rms (α−1)Δ_CA, τ~U(0,σ) | rms (α−1)Δ_CA, τ~U[.02,.98] | rms DM g | CA normaliser at floor |",
            "|---|---|---|---|---|"]
    sched = fixed_schedule(n_steps)
    for i in range(n_steps):
        a = backward_simulate(method.student, z, sched, torch.full((n,), i), cond, grad=False)
        u, vals, at_floor = torch.rand(n, generator=g), [], 0.0
        for kind in ("uniform_capped", "uniform"):
            tau = renoise_time(u, kind, a.sigma)
            xt = renoise(a.x0, tau, torch.randn(a.x0.shape, generator=g))
            xc, xu = teacher_x0(teacher, xt, tau, cond), teacher_x0(teacher, xt, tau, torch.full_like(cond, -1))
            nca = normaliser(xc, a.x0, 0.1)
            vals.append(float(((w - 1) * (xc - xu) / nca[:, None]).pow(2).mean().sqrt()))
            at_floor = at_floor or float((nca <= 0.1 + 1e-6).float().mean())
        real, fake = dm_terms(teacher, method.fake, a.x0, renoise_time(u, "uniform"), cond, 1.0)
        _, gdm = dm_loss(a.x0, real, fake, 0.1)
        rows.append(f"| {float(sched[i]):.2f} | {vals[0]:.3f} | {vals[1]:.3f} | {float(gdm.pow(2).mean().sqrt()):.3f} | "
                    f"{at_floor:.2f} |")
    return rows


def _mean(res: dict[str, Any], name: str, nfe: int, key: str = "mmd2") -> float | None:
    if name.startswith("teacher "):
        rows = [res["teacher"][str(s)][name[8:]][key] for s in res["seeds"]]
    else:
        per = res["students"].get(name, {})
        rows = [per[str(s)]["metrics"][str(nfe)][key] for s in res["seeds"] if str(s) in per]
    return sum(rows) / len(rows) if rows else None


def checks(res: dict[str, Any]) -> list[str]:
    """The quality bars and the CFG-free finding as pass/fail lines from the measured means."""
    out = []
    bars = [("cdm (full, dynamic, euler)", 4, "teacher euler 16"), ("dmd2 (1-step)", 1, "teacher euler 4")]
    for name, k, ref in bars:
        a, b = _mean(res, name, k), _mean(res, ref, 0)
        if a is not None and b is not None:
            out.append(f"- {name} at {k} NFE: MMD² {a:.4f} vs guided {ref}: {b:.4f} -> "
                       f"{'PASS' if a < b else 'FAIL'}")
    for name in ("cdm DM only", "DM-only 1-step (dmd2, w=1 real)"):
        for k in NFES:
            g, u = _mean(res, name, k), _mean(res, name, k, "mmd2_w1")
            if g is not None and u is not None:
                out.append(f"- CFG-free finding, {name} at {k} NFE: MMD² to w=1 target {u:.4f} vs to guided "
                           f"target {g:.4f} -> {'closer to w=1' if u < g else 'closer to guided'}")
    return out


def write_report(res: dict[str, Any], out: Path, cmd: str) -> str:
    seeds = res["seeds"]
    lines = [f"# DMD-family results ({res['preset']} conditional, guidance w={res['w']})", "", f"Command: `{cmd}`", "",
             f"Seeds {seeds}; {res['steps']} student steps, batch 256, MLP {STUDENT}, teacher init = "
             f"{res['pretrain_steps']} flow-matching steps; MMD² (bandwidths 0.05/0.2/1 summed), 2000 vs 2000, "
             "mean ± std over seeds. `mmd2` = to the guided target (adaptive guided ODE); `mmd2_w1` = to the "
             "exact unguided conditional mixture; wall = seconds per run on a shared 2-core CPU.", "",
             "## Teacher baselines (guided ODE)", "", "| sampler | MMD² guided | MMD² w=1 | modes covered |",
             "|---|---|---|---|"]
    for k in res["teacher"][str(seeds[0])]:
        v = [res["teacher"][str(s)][k] for s in seeds]
        lines.append(f"| {k} | {summarise([r['mmd2'] for r in v])} | {summarise([r['mmd2_w1'] for r in v])} | "
                     f"{summarise([r['modes_covered'] for r in v])} |")
    lines += ["", "## Students", "", "| student | NFE | MMD² guided | MMD² w=1 | modes covered | off-mode | wall s |",
              "|---|---|---|---|---|---|---|"]
    for name, per_seed in res["students"].items():
        for k in NFES:
            v = [per_seed[str(s)]["metrics"][str(k)] for s in seeds if str(s) in per_seed]
            wall = [per_seed[str(s)]["wall_s"] for s in seeds if str(s) in per_seed]
            lines.append(f"| {name} | {k} | {summarise([r['mmd2'] for r in v])} | "
                         f"{summarise([r['mmd2_w1'] for r in v])} | {summarise([r['modes_covered'] for r in v])} | "
                         f"{summarise([r['off_mode'] for r in v])} | {sum(wall) / len(wall):.0f} |")
    lines += ["", "## Checks (computed from the numbers above)", ""] + checks(res)
    if res.get("failures"):
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in res["failures"]]
    text = "\n".join(lines) + "\n"
    (out / "dmd.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ring8")
    p.add_argument("--w", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="substrings of variant names to run")
    p.add_argument("--others", action="store_true", help="also train other registered distillation students")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--fake-lr", type=float, default=1e-3)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--cache", default="/tmp/fewstep_dmd_cache", help="folder for the cached teacher-init nets")
    p.add_argument("--label", default="", help="suffix of the variant names (e.g. for a longer-budget rerun)")
    p.add_argument("--tag", default="", help="suffix of the JSON file (to run seeds in parallel processes)")
    p.add_argument("--diagnose", action="store_true", help="print CA vs DM update magnitudes of the seed-0 init")
    p.add_argument("--merge", nargs="*", default=None, help="merge these JSON files into dmd.md/dmd.json and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m fewstep.benchmarks.dmd_experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.diagnose:
        teacher = load_preset(args.preset, conditional=True)
        print("\n".join(ca_dm_magnitudes(teacher, args.w, pretrain(teacher, 0, args.pretrain_steps, Path(args.cache)))))
        return
    if args.merge is not None:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        res = {**parts[0], "seeds": sorted({s for r in parts for s in r["seeds"]}), "teacher": {}, "students": {},
               "commands": [r.get("command", "") for r in parts]}
        for r in parts:
            res["teacher"].update(r["teacher"])
            for name, per_seed in r["students"].items():
                res["students"].setdefault(name, {}).update(per_seed)
        (out / "dmd.json").write_text(json.dumps(res, indent=1))
        print(write_report(res, out, " ; ".join(res["commands"]) + " ; then " + cmd))
        return
    teacher = load_preset(args.preset, conditional=True)
    guided = GuidedTeacher(teacher, args.w)
    variants = {k + args.label: v for k, v in VARIANTS.items() if args.only is None or any(o in k for o in args.only)}
    if args.others:
        avail = list_methods()
        variants.update({f"{m} (guided teacher)": (m, cfg) for m, cfg in OTHERS.items() if m in avail})
    res: dict[str, Any] = {"preset": args.preset, "w": args.w, "steps": args.steps, "seeds": args.seeds,
                           "pretrain_steps": args.pretrain_steps, "teacher": {}, "students": {}, "command": cmd,
                           "lr": args.lr, "fake_lr": args.fake_lr}
    for seed in args.seeds:
        refs = references(teacher, args.w, 2000, seed)
        res["teacher"][str(seed)] = teacher_rows(teacher, args.w, refs)
        init = pretrain(teacher, seed, args.pretrain_steps, Path(args.cache))
        res["students"].setdefault("teacher-init (FM net, Euler)", {})[str(seed)] = {
            "metrics": eval_student(make_trainer("flow_matching", teacher, {}, init, seed, 0, 1e-3, 1e-3)
                                    .method.student, refs, teacher), "wall_s": 0.0}
        for name, (meth, cfg) in variants.items():
            t0 = time.time()
            has_w = "guidance" in {f.name for f in dataclasses.fields(get_method(meth).config_class)}
            cfg = {"guidance": args.w, **cfg} if has_w else dict(cfg)
            try:
                tr = make_trainer(meth, teacher if has_w else guided, cfg, init, seed, args.steps, args.lr,
                                  args.fake_lr)
                tr.fit()
            except Exception as e:  # record and go on: one failing method must not lose the others
                print(f"seed {seed} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                res.setdefault("failures", []).append(f"seed {seed} {name}: {type(e).__name__}: {e}")
                continue
            m = eval_student(tr.student(ema=True), refs, teacher)
            res["students"].setdefault(name, {})[str(seed)] = {"metrics": m, "wall_s": time.time() - t0}
            print(f"seed {seed} {name:38s} " + " ".join(f"{k}:{m[str(k)]['mmd2']:.4f}/{m[str(k)]['mmd2_w1']:.4f}"
                                                        for k in NFES) + f"  {time.time() - t0:.0f}s", flush=True)
            (out / f"dmd{args.tag}.json").write_text(json.dumps(res, indent=1))
    if not args.tag:
        print(write_report(res, out, cmd))


if __name__ == "__main__":
    main()
