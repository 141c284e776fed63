r"""Which target does each distribution-matching loss drive a student to? (class-overlapping 2-D teachers)

Three candidate targets for a class-conditional teacher under CFG weight w (all sampled exactly, same labels):

* ``guided_ode``: the endpoint of the CFG-guided teacher ODE :math:`\dot x = v_u + w(v_c - v_u)` from t=1 to 0
  (adaptive dopri5, rtol = atol = 1e-6);
* ``tilted``: :math:`q_w(x|c) \propto p_0(x|c)^w p_0(x)^{1-w}`, the t→0 fixed point of a DM loss whose real score
  is the guided score (grid sampler of :mod:`fewstep.benchmarks.guided_targets`);
* ``mixture``: the w = 1 conditional mixture :math:`p_0(x|c)` (exact samples).

On ring8/aniso3 the tilted density equals the mixture (classes do not overlap at t=0); on ``shared3`` and
``overlap2`` (:mod:`fewstep.teachers.presets`) the three are apart for w > 1. ``--separation`` reports their
pairwise MMD² and each target's noise floor (two independent draws of the same target). Training mode trains the
DM-family variants of :data:`VARIANTS` from a flow-matching teacher init (the machinery of
:mod:`fewstep.benchmarks.dmd_experiments`) and scores the EMA student at 1, 2, 4 NFE against all three targets
(report: :mod:`fewstep.benchmarks.dm_targets_report`; one student against one target, ``fewstep eval --target``:
:mod:`fewstep.benchmarks.dm_targets_eval`).

Run: ``python -m fewstep.benchmarks.dm_targets --preset shared3 --separation --w 1 2 4 --seeds 0 1 2 3 4`` and
``python -m fewstep.benchmarks.dm_targets --preset shared3 --w 4 --seeds 0 1 2 3 4 --steps 150 --n 1000``, then
``--merge <json files> --out docs/results`` (per-run files and/or an earlier merged ``dm_targets.json``; runs
with different ``--steps`` are kept apart).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.benchmarks.dm_targets_report import NFES, TARGETS, merge_and_report
from fewstep.benchmarks.dmd_experiments import make_trainer, pretrain, references, run_settings
from fewstep.benchmarks.guided_targets import sample_tilted
from fewstep.evaluation.metrics import mmd2
from fewstep.sampling.samplers import sample_flowmap
from fewstep.teachers.presets import load_preset

__all__ = [
    "TARGETS",
    "VARIANTS",
    "target_samples",
    "score_targets",
    "separation",
    "train_variant",
    "teacher_rows",
]

PAPER = {"fake_samples": "anchor", "ca_norm": "separate"}  # the CDM code's choices
# name -> (method, method config); "guidance" is set to w. One run setting (RUN + CLI overrides) for all.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "teacher init (FM net, Euler; not trained)": ("flow_matching", {}),
    "dmd (1-step, +regression)": ("dmd", {"n_steps": 1, "num_pairs": 1024}),
    "dmd2 (1-step)": ("dmd2", {"n_steps": 1}),
    "ddmd (4-step)": ("ddmd", {}),
    "cdm tuned (fake=final, ca_norm=cfg)": ("cdm", {}),
    "cdm paper-form (fake=anchor, ca_norm=separate)": ("cdm", dict(PAPER)),
    "cdm tuned, fixed schedule": ("cdm", {"schedule": "fixed"}),
    "cdm tuned, no off-trajectory": ("cdm", {"off_trajectory": False}),
    "cdm tuned, gaussian perturbation": ("cdm", {"perturbation": "gaussian"}),
    "cdm tuned, CA only": ("cdm", {"dm_weight": 0.0, "cdm_weight": 0.0}),
    "cdm tuned, DM at final anchor": ("cdm", {"dm_at": "final"}),
    "dmd2, tau in [0.02, 0.3]": ("dmd2", {"n_steps": 1, "t_max": 0.3}),
    "ddmd, DM at final anchor": ("ddmd", {"dm_at": "final"}),
    "cdm paper-form, fixed schedule": ("cdm", {**PAPER, "schedule": "fixed"}),
    "cdm paper-form, no off-trajectory": ("cdm", {**PAPER, "off_trajectory": False}),
    "cdm paper-form, gaussian perturbation": ("cdm", {**PAPER, "perturbation": "gaussian"}),
    "cdm paper-form, CA only": ("cdm", {**PAPER, "dm_weight": 0.0, "cdm_weight": 0.0}),
}


def target_samples(
    teacher: Any,
    w: float,
    n: int,
    seed: int,
    box: float = 4.5,
    cell: float = 0.01,
    cache: dict[Any, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Labels, evaluation noise and two independent draws of each target (``<name>`` and ``<name>_2``).

    Args:
        teacher: A class-conditional 2-D mixture teacher.
        w: Guidance weight.
        n: Samples per draw.
        seed: Seed of the labels, noise and draws (the labels and noise are those of ``dmd_experiments``).
        box: Half-width of the tilted sampler's grid.
        cell: Grid spacing of the tilted sampler.
        cache: Optional grid-CDF cache of :func:`~fewstep.benchmarks.guided_targets.sample_tilted`.

    Returns:
        Dict with ``cond``, ``z`` (the students' noise) and each target twice, float64, all with labels ``cond``.
    """
    refs = references(teacher, w, n, seed)  # guided ODE from independent noise, and from z ("adaptive")
    g = torch.Generator().manual_seed(30_000 + seed)
    cond = refs["cond"]
    out = {
        "cond": cond,
        "z": refs["z"],
        "guided_ode": refs["ref"],
        "guided_ode_2": refs["adaptive"],
        "mixture": refs["ref_w1"],
        "mixture_2": teacher.sample(n, cond=cond, generator=g, dtype=torch.float64),
    }
    for key in ("tilted", "tilted_2"):
        out[key] = sample_tilted(teacher, cond, w, 0.0, box, cell, generator=g, cache=cache)
    return out


def score_targets(x: Tensor, tg: dict[str, Tensor]) -> dict[str, float]:
    """MMD² (RBF bandwidths 0.05/0.2/1 summed, unbiased) of samples ``x`` to each of the three targets."""
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return {t: float("nan") for t in TARGETS}
    return {t: mmd2(x, tg[t]) for t in TARGETS}


def separation(tg: dict[str, Tensor]) -> dict[str, float]:
    """Pairwise MMD² of the targets and each target's floor (its two independent draws)."""
    out = {f"{a} vs {b}": mmd2(tg[a], tg[b]) for i, a in enumerate(TARGETS) for b in TARGETS[i + 1 :]}
    out.update({f"floor {t}": mmd2(tg[t], tg[t + "_2"]) for t in TARGETS})
    return out


def teacher_rows(
    teacher: Any, w: float, tg: dict[str, Tensor], steps: tuple[int, ...] = (1, 2, 4, 8, 16)
) -> dict[str, dict[str, float]]:
    """The guided teacher's Euler sampler with K steps from the students' noise, MMD² to each target (the bars)."""
    from fewstep.sampling.samplers import solve

    kw = {"guidance": w} if w != 1.0 else {}
    return {str(k): score_targets(solve(teacher, tg["z"], k, cond=tg["cond"], **kw).x, tg) for k in steps}


def train_variant(
    teacher: Any, name: str, w: float, seed: int, run: dict[str, Any], init: dict[str, Tensor], tg: dict[str, Tensor]
) -> dict[str, Any]:
    """Train variant ``name`` at guidance w from the teacher init; MMD² of its EMA student to each target per NFE."""
    method, cfg = VARIANTS[name]
    t0 = time.time()
    if method == "flow_matching":  # the starting point of every student: the teacher init, 0 steps
        tr = make_trainer(method, teacher, cfg, init, seed, {**run, "steps": 0})
    else:
        tr = make_trainer(method, teacher, {**cfg, "guidance": w}, init, seed, run)
    tr.fit()
    student = tr.student(ema=True)
    metrics = {}
    for k in NFES:
        with torch.no_grad():
            x = sample_flowmap(student, tg["z"].float(), k, cond=tg["cond"]).x
        metrics[str(k)] = score_targets(x, tg)
    return {"metrics": metrics, "wall_s": time.time() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shared3")
    p.add_argument("--w", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--separation", action="store_true", help="only the targets' pairwise MMD² and floors")
    p.add_argument("--only", nargs="*", default=None, help="exact variant names to train (default: all)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--box", type=float, default=4.5)
    p.add_argument("--cell", type=float, default=0.01)
    p.add_argument("--cache", default="runs/dm_targets/cache", help="teacher-init cache (per preset)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--tag", default="", help="suffix of the JSON file (for runs in separate processes)")
    p.add_argument("--merge", nargs="*", default=None, help="merge these JSON files into dm_targets.md/.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cmd = "python -m fewstep.benchmarks.dm_targets " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        print(merge_and_report([Path(f) for f in args.merge], out, cmd, tuple(VARIANTS)))
        return
    unknown = set(args.only or []) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; valid: {sorted(VARIANTS)}")
    teacher = load_preset(args.preset, conditional=True)
    run = run_settings("all", {}, {"steps": args.steps, "batch_size": args.batch_size})
    res: dict[str, Any] = {
        "preset": args.preset,
        "commands": [cmd],
        "seeds": args.seeds,
        "n": args.n,
        "run": run,
        "pretrain_steps": args.pretrain_steps,
        "separation": {},
        "students": {},
    }
    path = out / f"dm_targets_{args.preset}{args.tag}.json"
    cache: dict[Any, Tensor] = {}
    for w in args.w:
        tgs = {}
        for seed in args.seeds:
            tgs[seed] = tg = target_samples(teacher, w, args.n, seed, args.box, args.cell, cache)
            res["separation"].setdefault(f"{w:g}", {})[str(seed)] = sep = separation(tg)
            res.setdefault("teacher", {}).setdefault(f"{w:g}", {})[str(seed)] = teacher_rows(teacher, w, tg)
            print(f"w={w:g} seed {seed} " + " ".join(f"{k}: {v:.4f}" for k, v in sep.items()), flush=True)
            path.write_text(json.dumps(res, indent=1))
        cache.clear()
        if args.separation:
            continue
        for name in args.only or list(VARIANTS):  # variant-major: each variant gets all seeds before the next
            for seed in args.seeds:
                init = pretrain(teacher, seed, args.pretrain_steps, Path(args.cache) / args.preset, {})
                rec = train_variant(teacher, name, w, seed, run, init, tgs[seed])
                res["students"].setdefault(name, {}).setdefault(f"{w:g}", {})[str(seed)] = rec
                print(
                    f"w={w:g} seed {seed} {name:48s} "
                    + " ".join(
                        f"{k}:" + "/".join(f"{rec['metrics'][k][t]:.4f}" for t in TARGETS) for k in rec["metrics"]
                    )
                    + f" {rec['wall_s']:.0f}s",
                    flush=True,
                )
                path.write_text(json.dumps(res, indent=1))
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
