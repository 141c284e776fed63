r"""Does marginal alignment (MA) help? Compute-matched sweeps for issue 14 (items 3-5).

Every arm is a run config: ``configs/reflow_ma.yaml`` (``--method reflow``) or ``configs/perflow_ma.yaml``
(``--method perflow``) plus dotted overrides, trained exactly as ``fewstep distill --config <base> <overrides>`` would
train it (:mod:`fewstep.benchmarks.ma_arms`); ``--method reflow2`` is 2-rectified flow, round 2 on the pairs of a
round-1 reflow student (:mod:`fewstep.benchmarks.ma_rectify`; as a config: ``configs/reflow2_ma.yaml``). Arms per
target and seed:

* ``base@N``: :math:`\lambda = 0`, N steps (the equal-steps baseline);
* ``MA λ start`` / ``MA λ mid``: :math:`\lambda > 0` from step 0 / from step N/2, N steps;
* ``base@cpu-mid`` / ``base@cpu``: :math:`\lambda = 0` for round((1+r)/2·N) / round(r·N) steps, the equal-compute
  baselines of the two MA schedules, where r = (CPU time of an MA step) / (CPU time of a plain step), measured
  by :func:`calibrate` as single-thread process time (robust to other load on shared cores).

Each trained EMA student is saved in the cache (``--cache``) and measured by
:func:`fewstep.benchmarks.ma_eval.evaluate_student` (1/2/4 NFE), its held-out FM-on-pairs loss, and
:func:`fewstep.evaluation.diagnose.diagnose_tv` over 4 windows; :mod:`fewstep.benchmarks.ma_report` turns the JSON
into markdown tables (95 % t-intervals over seeds, paired by seed; claim (i) pairs; the TV-bound correlation);
docs/results/ma.md is the hand-written summary of those tables.

Run: ``python -m fewstep.benchmarks.ma_experiments sweep --presets ring8 aniso3 --out docs/results/ma.json``,
then ``python -m fewstep.benchmarks.ma_experiments report docs/results/ma.json --out docs/results/ma_tables.md``;
``--quick`` is a smoke run. ``--teacher-run <run folder>`` sweeps a learned teacher (a ``fewstep train-teacher`` run)
instead of presets, scored by MMD² / FD against its held-out real data (:mod:`fewstep.benchmarks.ma_teacher_run`).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.ma_arms import (
    LAMBDAS,
    MA_DEFAULT,
    Arm,
    Budget,
    arm_overrides,
    arms,
    calibrate,
    cli_line,
    train_arm,
)
from fewstep.benchmarks.ma_eval import BASE_CONFIG, arm_config, evaluate_student, heldout_fm_loss, load_student
from fewstep.benchmarks.ma_rectify import ROUND1, round_one, round_two_note, second_round
from fewstep.benchmarks.ma_teacher_run import (
    evaluate_learned,
    floors,
    is_learned_sweep,
    is_run_target,
    learned_refs,
    load_target,
    run_folder,
    run_target,
    spread_table,
    target_tag,
    write_learned_report,
)
from fewstep.core.io import git_commit
from fewstep.evaluation.diagnose import diagnose_tv
from fewstep.methods._shared.pairs import PairSolver, generate_pairs

# the arm layer lives in ma_arms; re-exported here for callers of the sweep module
__all__ = [
    "LAMBDAS",
    "MA_DEFAULT",
    "Arm",
    "Budget",
    "arm_config",
    "arms",
    "arm_overrides",
    "cli_line",
    "calibrate",
    "train_arm",
    "sweep",
    "main",
]


def heldout_pairs(teacher: Any, folder: Path, n: int = 4096) -> tuple[torch.Tensor, ...]:
    """Held-out pairs (pair seed 777, RK4-64) and fixed times t ~ U(0, 1) (seed 778) for the FM-on-pairs loss."""
    p = generate_pairs(teacher, folder, n, PairSolver("rk4", 64), seed=777, progress=False)
    t = torch.rand(n, generator=torch.Generator().manual_seed(778), dtype=torch.float64)
    return p.x1.double(), p.x0.double(), t


def measure(
    student: Any, teacher: Any, held: tuple[torch.Tensor, ...], seed: int, n_eval: int, knn_max_dim: int = 3,
    refs: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of one trained student (per-NFE sample metrics, held-out pair loss, the 4-window TV bound) and its
    per-pair held-out losses; density-free k-NN KL/TV up to ``knn_max_dim`` dimensions. With ``refs`` (a learned
    teacher: :func:`fewstep.benchmarks.ma_teacher_run.learned_refs`) the sample metrics are MMD² / FD only."""
    fm = heldout_fm_loss(student, *held)
    ev = evaluate_learned(student, refs, n_eval, seed) if refs is not None else None
    res: dict[str, Any] = {
        "eval": ev or evaluate_student(student, teacher, n=n_eval, seed=seed, knn_max_dim=knn_max_dim),
        "fm_loss": float(fm.mean()),
        "fm_loss_se": float(fm.std() / len(fm) ** 0.5),
    }
    if refs is None and teacher.dim <= 16:
        d = diagnose_tv(student, teacher, 4, n=n_eval, seed=seed, mode="jump", verbose=False)
        res["tv_bound"] = {
            k: d.get(k)
            for k in (
                "sum_eps",
                "sum_sqrt_kl_half",
                "tv_final",
                "tv_final_se",
                "kl_final",
                "final_fold_fraction",
                "valid",
            )
        }
        res["tv_bound"]["eps"] = [t["eps"] for t in d["terms"]]
        res["tv_bound"]["fold"] = [t.get("fold_fraction") for t in d["terms"]]
    return res, fm


def sweep(
    presets: list[str],
    seeds: list[int],
    budget: Budget,
    out: Path,
    cache: Path,
    method: str = "reflow",
    ma: dict[str, Any] | None = None,
    lambdas: tuple[float, ...] = LAMBDAS,
    ratio: float | None = None,
    n_eval: int = 2000,
    only: list[str] | None = None,
    n_held: int = 4096,
    round1_steps: int = 2000,
    knn_max_dim: int = 3,
) -> dict[str, Any]:
    """Train and measure every arm x seed (resumable: keys already in ``out`` are skipped); returns the results.

    Density-free k-NN KL/TV are measured for targets of dimension <= ``knn_max_dim`` (recorded in ``settings``).

    ``method="reflow2"`` is 2-rectified flow (:mod:`fewstep.benchmarks.ma_rectify`): per seed a round-1 reflow
    student (``round1_steps`` steps, recorded as arm ``round1``), then every arm is round 2 on its pairs.
    """
    torch.set_num_threads(1)
    ma = dict(MA_DEFAULT if ma is None else ma)
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    res.setdefault("settings", {}).update(
        {
            "budget": vars(budget),
            "method": method,
            "ma": ma,
            "seeds": seeds,
            "lambdas": list(lambdas),
            "base_config": BASE_CONFIG[method],
            "knn_max_dim": knn_max_dim,
        }
    )
    res["settings"].setdefault("git", git_commit(short=True))
    if any(is_run_target(p) for p in presets):
        res["settings"]["teacher_run"] = [str(run_folder(p)) for p in presets if is_run_target(p)]
    if method == "reflow2":
        res["settings"]["round1_steps"] = round1_steps
    res.setdefault("runs", {})
    res.setdefault("ratio", {})
    for preset in presets:
        teacher, tag = load_target(preset), target_tag(preset)
        pair_dir = cache / "pairs" / tag
        if tag not in res["ratio"]:  # round 2 costs what reflow costs per step: calibrate reflow
            cal = "reflow" if method == "reflow2" else method
            res["ratio"][tag] = ratio if ratio is not None else calibrate(cal, preset, budget, ma, pair_dir)
            print(f"{tag}: cost ratio r = {res['ratio'][tag]:.2f}", flush=True)
        held = heldout_pairs(teacher, cache / "heldout" / f"{tag}-{n_held}", n_held)
        refs = learned_refs(preset, held, n_eval) if is_run_target(preset) else None
        if refs is not None and tag not in res.setdefault("floor", {}):
            res["floor"][tag] = floors(teacher, refs, preset, n_eval)
        setups: dict[int, Any] = {}
        for seed in seeds if method == "reflow2" else []:
            r1, rec = round_one(preset, seed, budget, round1_steps, pair_dir, cache / "students")
            key = f"{tag}/{method}/{ROUND1}/{seed}"
            if rec is not None or key not in res["runs"]:
                m, fm = measure(copy.deepcopy(r1), teacher, held, seed, n_eval, knn_max_dim, refs)
                res["runs"][key] = {**res["runs"].get(key, {}), **(rec or {}), **m}
                torch.save({"state": r1.state_dict(), "fm_rows": fm.float()}, res["runs"][key]["student_file"])
                out.write_text(json.dumps(res, indent=1, default=float))
            setups[seed] = (second_round(r1), res["runs"][key]["student_file"])
        for arm in arms(budget, res["ratio"][tag], lambdas):
            for seed in seeds:
                key = f"{tag}/{method}/{arm.name}/{seed}"
                if only and arm.name not in only:
                    continue
                if key in res["runs"]:
                    old = res["runs"][key]
                    fresh = refs is None and teacher.dim <= knn_max_dim and "kl_knn" not in old["eval"]["1"]
                    if fresh and Path(old["student_file"]).is_file():
                        m, _ = measure(load_student(old)[0], teacher, held, seed, n_eval, knn_max_dim)
                        old.update(m)
                        out.write_text(json.dumps(res, indent=1, default=float))
                    continue
                ov = arm_overrides(preset, arm, seed, budget, ma, method)
                setup, r1_file = setups.get(seed, (None, ""))
                pdir = pair_dir if setup is None else cache / "pairs" / f"{tag}-round2-{round1_steps}-{seed}"
                student, _, timing = train_arm(method, ov, pdir, setup)
                m, fm = measure(student, teacher, held, seed, n_eval, knn_max_dim, refs)
                path = cache / "students" / (key.replace("/", "__").replace(" ", "_") + ".pt")
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"state": student.state_dict(), "fm_rows": fm.float()}, path)
                res["runs"][key] = {
                    **m,
                    **timing,
                    "steps": arm.steps,
                    "lam": arm.lam,
                    "warmup": arm.warmup,
                    "cli": cli_line(method, ov, f"runs/ma/{key.replace(' ', '_')}")
                    + (round_two_note(r1_file) if setup else ""),
                    "student_file": str(path),
                }
                e1 = m["eval"][1]
                print(
                    f"{key}: {timing['cpu_s_per_step'] * 1e3:.1f} cpu-ms/step, 1-NFE mmd2 {e1['mmd2']:.4g} "
                    f"kl_is {e1.get('kl_is', float('nan')):.3g} fold {e1.get('fold', float('nan')):.2f} "
                    f"fd {e1.get('fd', float('nan')):.3g}",
                    flush=True,
                )
                out.write_text(json.dumps(res, indent=1, default=float))
    return res


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``sweep`` (train + measure) and ``report`` (markdown from result JSON files)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--presets", nargs="+", default=["ring8", "aniso3"])
    s.add_argument("--teacher-run", default="", help="a `fewstep train-teacher` run folder (learned teacher) instead "
                   "of --presets: MMD² / FD against its held-out real data (fewstep.benchmarks.ma_teacher_run)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    s.add_argument("--method", default="reflow", choices=sorted(BASE_CONFIG))
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--hidden", type=int, default=64)
    s.add_argument("--depth", type=int, default=3)
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--n-pairs", type=int, default=20000)
    s.add_argument("--lambdas", nargs="+", type=float, default=list(LAMBDAS))
    s.add_argument(
        "--ma", default=None, help="JSON of method.cfg MA keys (default: MA_DEFAULT; '{}' = the method's own defaults)"
    )
    s.add_argument("--ratio", type=float, default=None, help="fix the cost ratio r instead of measuring it")
    s.add_argument("--only", nargs="+", default=None, help="train only these arm names")
    s.add_argument("--n-eval", type=int, default=2000)
    s.add_argument("--cache", default="/tmp/fewstep_ma")
    s.add_argument("--out", default="docs/results/ma.json")
    s.add_argument("--round1-steps", type=int, default=2000, help="reflow2: steps of the round-1 student")
    s.add_argument(
        "--knn-max-dim", type=int, default=3, help="density-free k-NN KL/TV up to this target dimension (bias grows)"
    )
    s.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 12 steps, 1 lambda, tiny student, r=2")
    mo = sub.add_parser("modes", help="mode coverage (learned teacher: sample spread) of the cached students")
    mo.add_argument("json", nargs="+")
    mo.add_argument("--nfe", type=int, default=4)
    r = sub.add_parser("report")
    r.add_argument("json", nargs="+")
    r.add_argument("--out", default="docs/results/ma_tables.md", help="generated tables (not the summary ma.md)")
    a = p.parse_args(argv)
    if a.cmd == "modes":
        from fewstep.benchmarks.ma_eval import mode_table

        runs = {k: v for f in a.json for k, v in json.loads(Path(f).read_text())["runs"].items()}
        learned = is_learned_sweep([Path(f) for f in a.json])  # no components: the spread of the samples instead
        print("\n".join(spread_table(runs, a.nfe) if learned else mode_table(runs, a.nfe)))
        return
    if a.cmd == "report":
        from fewstep.benchmarks.ma_report import write_report

        files = [Path(f) for f in a.json]
        (write_learned_report if is_learned_sweep(files) else write_report)(files, Path(a.out))
        return
    try:
        ma = None if a.ma is None else json.loads(a.ma)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--ma is not valid JSON: {e}") from None
    budget = Budget(a.steps, a.batch, a.hidden, a.depth, a.n_pairs)
    seeds, lambdas, n_eval, n_held, ratio = a.seeds, tuple(a.lambdas), a.n_eval, 4096, a.ratio
    if a.quick:
        budget, seeds, lambdas, n_eval, n_held = Budget(12, 32, 16, 2, 512), [0, 1], (1e-3,), 200, 256
        ratio = 2.0 if ratio is None else ratio
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    r1, presets = 24 if a.quick else a.round1_steps, [run_target(a.teacher_run)] if a.teacher_run else a.presets
    sweep(
        presets, seeds, budget, out, Path(a.cache), a.method, ma, lambdas, ratio, n_eval, a.only, n_held, r1,
        a.knn_max_dim,
    )


if __name__ == "__main__":
    main()
