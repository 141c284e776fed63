r"""DMD-family experiments on a class-conditional analytic teacher with guidance w (writes docs/results/dmd.md/.json).

Target: the CFG-guided teacher :math:`v_u + w(v_c - v_u)`; its reference samples come from the adaptive
(dopri5) ODE solve of the guided field from independent noise; the w=1 target is the exact conditional mixture.
Metric: unbiased RBF MMD² (bandwidths 0.05/0.2/1 summed, ``fewstep.evaluation.metrics.mmd2``), 2000 vs 2000 samples,
labels drawn from the class weights. Students start from a flow-matching velocity net trained on the
teacher's samples ("teacher init", as DMD initialises generator and fake score from the teacher); the fake
score starts from the same net. Experiments:

a. CFG-free finding: DM-only students vs the guided (w) and unguided (w=1) targets.
b. CDM ablations at 1/2/4 NFE: dynamic vs fixed schedule, off-trajectory on/off, Euler vs Gaussian, CA only /
   DM only / full.
c. Mode coverage of DMD-family students next to other registered distillation students.

Each variant has its own run settings (RUN updated by the variant's overrides; ``--steps/--lr/--fake-lr/
--batch-size`` override all). Run: ``python -m fewstep.benchmarks.dmd_experiments [--seeds 0 1 2 --others]``.
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

from fewstep.config.build import build_from_objects
from fewstep.config.schema import TrainConfig
from fewstep.evaluation.metrics import mmd2, mode_coverage
from fewstep.methods import get_method, list_methods
from fewstep.sampling.samplers import sample_flowmap, solve, solve_adaptive
from fewstep.teachers.guided import GuidedTeacher
from fewstep.teachers.presets import load_preset
from fewstep.training.trainer import Trainer

STUDENT: dict[str, Any] = {"hidden": 128, "depth": 3}
NFES = (1, 2, 4)
# default run settings; a variant's third entry overrides them (keys of RUN_KEYS), the CLI overrides both
RUN: dict[str, Any] = {"steps": 1000, "lr": 3e-4, "fake_lr": 1e-3, "batch_size": 256, "lr_schedule": "constant",
                       "student": {}}
RUN_KEYS = tuple(RUN)
DMD2_RUN: dict[str, Any] = {"lr": 1e-3, "fake_lr": 2e-3, "lr_schedule": "cosine", "batch_size": 512,
                            "student": {"hidden": 256, "depth": 4}}

# name -> (method, method config, run overrides); "guidance" is filled in with w
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "dmd2 (1-step)": ("dmd2", {"n_steps": 1}, DMD2_RUN),
    "cdm (full, dynamic, euler)": ("cdm", {}, {}),
    "cdm fixed schedule": ("cdm", {"schedule": "fixed"}, {}),
    "cdm no off-trajectory": ("cdm", {"off_trajectory": False}, {}),
    "cdm gaussian perturbation": ("cdm", {"perturbation": "gaussian"}, {}),
    "cdm DM only": ("cdm", {"ca_weight": 0.0, "cdm_weight": 0.0}, {}),
    "cdm CA only": ("cdm", {"dm_weight": 0.0, "cdm_weight": 0.0}, {}),
    "cdm paper fake/normaliser (anchor, separate)": ("cdm", {"fake_samples": "anchor", "ca_norm": "separate"}, {}),
    "DM-only 1-step (dmd2, w=1 real)": ("dmd2", {"n_steps": 1, "guidance": 1.0}, {}),
    "ddmd (4-step, fixed)": ("ddmd", {}, {}),
    "dmd (1-step, +regression)": ("dmd", {"n_steps": 1}, {}),
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
    """MMD² to the guided and to the w=1 target, mode coverage (per class) and, for 2-D rings, the mean radius and
    the sd of the offset from the nearest mode along the ring (tangential sd)."""
    x = x.to(torch.float64)
    cov = mode_coverage(x, teacher, cond=refs["cond"])
    means = teacher.means.to(x)
    near = means[torch.cdist(x, means).argmin(1)]
    tangent = torch.stack([-near[:, 1], near[:, 0]], 1) / near.norm(dim=1, keepdim=True)
    return {"mmd2": mmd2(x, refs["ref"]), "mmd2_w1": mmd2(x, refs["ref_w1"]),
            "modes_covered": float(cov["modes_covered"]), "off_mode": float(cov["off_mode"]),
            "radius": float(x.norm(dim=1).mean()), "tangential_sd": float(((x - near) * tangent).sum(1).std())}


def make_trainer(name: str, teacher: Any, cfg: dict[str, Any], init: dict[str, Tensor] | None, seed: int,
                 run: dict[str, Any]) -> Trainer:
    """A Trainer for method ``name`` with run settings ``run`` (RUN keys).

    Its student and fake score start from ``init``.
    """
    method, data = build_from_objects(name, teacher, None, cfg, {**STUDENT, **run["student"]}, seed)
    if init is not None and method.parameterization != "average_velocity":  # same backbone shapes
        method.student.net.load_state_dict(init)
        if hasattr(method, "fake"):
            method.fake.net.load_state_dict(init)
    over = {"fake": run["fake_lr"]} if "fake" in method.trainable() else {}
    tc = TrainConfig(steps=run["steps"], batch_size=run["batch_size"], lr=run["lr"], lr_overrides=over,
                     lr_schedule=run["lr_schedule"], ema_decays=[0.99], progress=False, tensorboard=False,
                     log_every=max(run["steps"] // 10, 1))
    return Trainer(method, data, tc, seed=seed)


def pretrain(teacher: Any, seed: int, steps: int, cache: Path, student: dict[str, Any]) -> dict[str, Tensor]:
    """Teacher init: a conditional velocity MLP trained by flow matching on the teacher's exact samples (cached)."""
    arch = {**STUDENT, **student}
    key = "_".join(f"{k}{v}" for k, v in sorted(arch.items()) if k not in ("hidden", "depth"))
    path = cache / f"fm_init_{arch['hidden']}x{arch['depth']}{'_' + key if key else ''}_{steps}_seed{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)  # tensors only: never unpickle code
    run = {**RUN, "steps": steps, "lr": 1e-3, "student": student}
    tr = make_trainer("flow_matching", teacher, {"cond_drop": 0.1}, None, seed, run)
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


def run_settings(name: str, overrides: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """The run settings of a variant: RUN, then the variant's overrides, then the CLI values that were given."""
    run = {**RUN, **overrides, **{k: v for k, v in cli.items() if v is not None}}
    unknown = set(run) - set(RUN_KEYS)
    if unknown:
        raise ValueError(f"variant {name!r} has unknown run settings {sorted(unknown)}; valid: {RUN_KEYS}")
    return run


def write_report(res: dict[str, Any], out: Path, cmd: str) -> str:
    seeds = res["seeds"]
    lines = [f"# DMD-family results ({res['preset']} conditional, guidance w={res['w']})", "", f"Command: `{cmd}`", "",
             f"Seeds {seeds}; teacher init = {res['pretrain_steps']} flow-matching steps of the student's MLP; "
             "MMD² (bandwidths 0.05/0.2/1 summed), 2000 vs 2000, mean ± std over seeds. `MMD² guided` = to the "
             "guided target (adaptive guided ODE); `MMD² w=1` = to the exact unguided conditional mixture; r = mean "
             "radius, t-sd = sd of the offset from the nearest mode along the ring; wall = seconds per run.", "",
             "## Teacher baselines (guided ODE)", "", "| sampler | MMD² guided | MMD² w=1 | modes covered | r | t-sd |",
             "|---|---|---|---|---|---|"]
    keys = ("mmd2", "mmd2_w1", "modes_covered", "radius", "tangential_sd")
    for k in res["teacher"][str(seeds[0])]:
        v = [res["teacher"][str(s)][k] for s in seeds]
        lines.append(f"| {k} | " + " | ".join(summarise([r.get(q, float("nan")) for r in v]) for q in keys) + " |")
    lines += ["", "## Students (MMD² mean ± std; shape columns at the student's own NFE: 1 for 1-step, else 4)", "",
              "| student | guided 1 NFE | guided 2 NFE | guided 4 NFE | w=1 at 1/2/4 "
              "| modes | off-mode | r | t-sd | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, per_seed in res["students"].items():
        ms = [per_seed[str(s)]["metrics"] for s in seeds if str(s) in per_seed]
        own = "1" if "1-step" in name else "4"
        wall = [per_seed[str(s)]["wall_s"] for s in seeds if str(s) in per_seed]
        w1 = "/".join(f"{sum(m[str(k)]['mmd2_w1'] for m in ms) / len(ms):.4f}" for k in NFES)
        lines.append(f"| {name} | " + " | ".join(summarise([m[str(k)]["mmd2"] for m in ms]) for k in NFES)
                     + f" | {w1} | "
                     + " | ".join(summarise([m[own].get(q, float("nan")) for m in ms])
                                  for q in ("modes_covered", "off_mode", "radius", "tangential_sd"))
                     + f" | {sum(wall) / len(wall):.0f} |")
    lines += ["", "## Run settings", ""] + [f"- {n}: {r}" for n, r in res.get("runs", {}).items()]
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
    p.add_argument("--steps", type=int, default=None, help="override every variant's student steps")
    p.add_argument("--lr", type=float, default=None, help="override every variant's student lr")
    p.add_argument("--fake-lr", type=float, default=None, help="override every variant's fake-score lr")
    p.add_argument("--batch-size", type=int, default=None, help="override every variant's batch size")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="substrings of variant names to run")
    p.add_argument("--others", action="store_true", help="also train other registered distillation students")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--cache", default="/tmp/fewstep_dmd_cache", help="folder for the cached teacher-init nets")
    p.add_argument("--label", default="", help="suffix of the variant names (e.g. for a longer-budget rerun)")
    p.add_argument("--tag", default="", help="suffix of the JSON file (to run seeds in separate processes)")
    p.add_argument("--merge", nargs="*", default=None, help="merge these JSON files into dmd.md/dmd.json and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m fewstep.benchmarks.dmd_experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge is not None:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        res = {**parts[0], "seeds": sorted({s for r in parts for s in r["seeds"]}), "teacher": {}, "students": {},
               "runs": {}, "commands": [r.get("command", "") for r in parts]}
        for r in parts:
            res["teacher"].update(r["teacher"])
            res["runs"].update(r.get("runs", {}))
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
        variants.update({f"{m} (guided teacher)": (m, cfg, {}) for m, cfg in OTHERS.items() if m in avail})
    cli = {"steps": args.steps, "lr": args.lr, "fake_lr": args.fake_lr, "batch_size": args.batch_size}
    runs = {name: run_settings(name, v[2], cli) for name, v in variants.items()}
    res: dict[str, Any] = {"preset": args.preset, "w": args.w, "seeds": args.seeds,
                           "pretrain_steps": args.pretrain_steps,
                           "teacher": {}, "students": {}, "command": cmd, "runs": runs}
    for seed in args.seeds:
        refs = references(teacher, args.w, 2000, seed)
        res["teacher"][str(seed)] = teacher_rows(teacher, args.w, refs)
        init = pretrain(teacher, seed, args.pretrain_steps, Path(args.cache), {})
        res["students"].setdefault("teacher-init (FM net, Euler)", {})[str(seed)] = {
            "metrics": eval_student(make_trainer("flow_matching", teacher, {}, init, seed, {**RUN, "steps": 0})
                                    .method.student, refs, teacher), "wall_s": 0.0}
        for name, (meth, cfg, _) in variants.items():
            t0 = time.time()
            has_w = "guidance" in {f.name for f in dataclasses.fields(get_method(meth).config_class)}
            cfg = {"guidance": args.w, **cfg} if has_w else dict(cfg)
            try:
                run = runs[name]
                vinit = init if not run["student"] else pretrain(teacher, seed, args.pretrain_steps, Path(args.cache),
                                                                 run["student"])
                tr = make_trainer(meth, teacher if has_w else guided, cfg, vinit, seed, run)
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
