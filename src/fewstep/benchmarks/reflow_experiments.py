r"""Reflow-family experiments (issue 4): under-determination, MA vs no MA, and the telescoping TV bound.

a. Under-determination (docs/methods.md §4; :mod:`fewstep.benchmarks.reflow_underdetermination`): equal
   trajectory loss, different marginals, on N(0, I₂) and on a trained ring8 reflow student.
b. reflow, reflow+MA, perflow, perflow+MA at equal steps on ring8, aniso3, digits (64-D) at 1/2/4 NFE: MMD²,
   mean exact log p_0 of the samples, exact KL (2-D), mode coverage; mean ± std over seeds; time per step.
c. :func:`fewstep.evaluation.diagnose.diagnose_tv` for every trained student of (b).

Run: ``python -m fewstep.benchmarks.reflow_experiments --out docs/results/reflow.md`` (add ``--quick`` for a
smoke run). Writes markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.reflow_underdetermination import ring8_underdetermination, rotation_vs_translation
from fewstep.core.flowmap import FlowMap
from fewstep.data.datasets import MixtureDataset
from fewstep.evaluation.diagnose import diagnose_tv
from fewstep.evaluation.evaluate import evaluate_flowmap, evaluate_velocity_solver
from fewstep.methods import get_method
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

__all__ = ["train_one", "run", "main"]

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "reflow": ("reflow", {}),
    "reflow+MA": ("reflow", {"ma_weight": 0.003}),
    "perflow": ("perflow", {}),
    "perflow+MA": ("perflow", {"ma_weight": 0.003}),
    # PeRFlow with an average-velocity student F(x, t, t_end): no ambiguity at shared window boundaries
    "perflow-av": ("perflow", {"student_parameterization": "average_velocity"}),
    "perflow-av+MA": ("perflow", {"student_parameterization": "average_velocity", "ma_weight": 0.003,
                                  "ma_mode": "jump"}),
}
# shared settings: MA switched on for the second half of training (a fine-tuning of the FM/window fit), on 128 rows
COMMON: dict[str, dict[str, Any]] = {
    "reflow": {"n_pairs": 20000, "pair_solver": "rk4", "pair_steps": 64, "ma_t_min": 0.05, "ma_batch": 128},
    "perflow": {"num_windows": 2, "solver": "rk4", "solve_steps": 4, "ma_t_min": 0.05, "ma_batch": 128},
}
# MA runs in each method's own default (ma_mode ode: the student's ODE on RK4 sub-steps, exact divergence up to 16
# entries, Hutchinson with probes held along the path above). Results generated before 2026-12-07 used, for every
# teacher with d > 2, Hutchinson with 2 probes on one Euler sub-step (46 % gradient error on a 64-D closed-form
# check, docs/results/ma_gradient.md); reproduce those with --extra '{"reflow": LEGACY_HIGH_DIM, "perflow": ...}'.
LEGACY_HIGH_DIM: dict[str, Any] = {"ma_mode": "hutchinson", "ma_probes": 2, "ma_substeps": 1, "ma_solver": "euler"}
# the 64-D mixture teacher costs ~1 ms per row-evaluation on this CPU: fewer pairs, cheaper window solves
PRESET_CFG: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {"reflow": {"n_pairs": 4096, "pair_steps": 16, "shard_size": 1024},
               "perflow": {"solver": "euler", "solve_steps": 2}},
}
PAIR_CACHE = Path("/tmp/fewstep_reflow_pairs")


def _student(dim: int, hidden: int, depth: int, param: str = "velocity") -> FlowMap:
    return FlowMap(MLP(dim, hidden, depth, emb_dim=32, use_s=param == "average_velocity"), param)


def train_one(preset: str, variant: str, seed: int, steps: int, hidden: int, depth: int, batch: int,
              extra: dict[str, Any] | None = None) -> tuple[FlowMap, Any, float, dict[str, float]]:
    """Train one student with :class:`fewstep.training.trainer.Trainer`.

    Returns (EMA student, method, s/step, last logs).
    """
    from fewstep.config.schema import TrainConfig
    from fewstep.training.trainer import Trainer

    teacher = load_preset(preset)
    name, cfg = VARIANTS[variant]
    cfg = {**COMMON[name], **cfg, "ma_warmup": steps // 2,
           **PRESET_CFG.get(preset, {}).get(name, {}), **(extra or {}).get(name, {})}
    if name == "reflow":  # one cached pair set per preset, shared by every seed and variant
        cfg.setdefault("pair_dir", str(PAIR_CACHE / preset))
    if "+MA" not in variant:
        cfg = {k: v for k, v in cfg.items() if not k.startswith("ma_")}
        cfg["ma_weight"] = 0.0
    cls = get_method(name)
    torch.manual_seed(seed)
    param = cfg.pop("student_parameterization", "velocity")
    method = cls(_student(teacher.dim, hidden, depth, param), teacher, cls.make_config(**cfg))
    data = MixtureDataset(teacher, conditional=False)
    tc = TrainConfig(steps=steps, batch_size=batch, lr=2e-3, lr_schedule="cosine", min_lr_ratio=0.05,
                     warmup_steps=50, ema_decays=[0.995], progress=False, tensorboard=False, log_every=100)
    tr = Trainer(method, data, tc, run_dir=None, seed=seed)
    tr.prepare()  # pair generation is not counted in the time per step
    t0 = time.perf_counter()
    tr.fit()
    sec = (time.perf_counter() - t0) / max(steps, 1)
    return tr.student(ema=True), method, sec, (tr.history[-1] if tr.history else {})


def evaluate(student: FlowMap, teacher: Any, n: int, seed: int) -> dict[int, dict[str, float]]:
    """Metrics at 1/2/4 NFE: :func:`evaluate_flowmap` in 2-D; in 64-D the same sample metrics without the
    (expensive, adaptive-teacher-solve) coupling error."""
    if teacher.dim <= 2:
        return evaluate_flowmap(student, teacher, nfe=(1, 2, 4), n=n, seed=seed)
    from fewstep.evaluation.evaluate import evaluate_samples, noise, reference_samples
    from fewstep.sampling.samplers import sample_flowmap

    x1, ref = noise(n, teacher, seed), reference_samples(teacher, n, seed)
    out = {}
    for k in (1, 2, 4):
        with torch.no_grad():
            xs = sample_flowmap(student, x1, k).x
        out[k] = {**evaluate_samples(xs, teacher, reference=ref, seed=seed), "nfe": float(k)}
    return out


def _route(flags: list[float]) -> str:
    """Which KL/TV estimate the seeds used: CoV (change of variables, no fold), k-NN, or a mix."""
    if not flags:
        return "–"
    cov = sum(1 for f in flags if f)
    return "CoV" if cov == len(flags) else "k-NN" if cov == 0 else f"CoV {cov}/k-NN {len(flags) - cov}"


def _fmt(vals: list[float], digits: int = 4) -> str:
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    s = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.{digits}g} ± {s:.{digits - 2}g}" if abs(m) < 1e4 else f"{m:.3e}"


def run(presets: list[str], seeds: list[int], steps: dict[str, int], out: Path, hidden: int = 128,
        depth: int = 3, batch: int = 256, n_eval: int = 2000, extra: dict[str, Any] | None = None,
        variants: list[str] | None = None, suffix: str = "") -> dict[str, Any]:
    """Run parts a-c, write ``out`` (markdown) and ``out.with_suffix('.json')``; return the results dict."""
    torch.set_num_threads(1)
    res: dict[str, Any] = {"a": {"gaussian": rotation_vs_translation()}, "b": {}, "c": {}, "teacher_euler": {},
                           "settings": {"seeds": seeds, "steps": steps, "hidden": hidden, "depth": depth,
                                        "batch": batch, "n_eval": n_eval, "extra": extra or {}}}
    variants = variants or list(VARIANTS)
    for preset in presets:
        teacher = load_preset(preset)
        if teacher.dim <= 2:
            res["teacher_euler"][preset] = {k: evaluate_velocity_solver(teacher, teacher, "euler", k, n=n_eval,
                                                                        seed=0) for k in (1, 2, 4, 8)}
        for variant in variants:
            for seed in seeds:
                st, method, sec, last = train_one(preset, variant, seed, steps[preset], hidden, depth, batch, extra)
                ev = evaluate(st.double(), teacher, n_eval if teacher.dim <= 2 else min(n_eval, 1000), seed)
                key = f"{preset}/{variant}{suffix}/{seed}"
                res["b"][key] = {"eval": ev, "sec_per_step": sec, "last_logs": last}
                grid = method.grid.tolist() if hasattr(method, "grid") else 4
                n_diag = n_eval if teacher.dim <= 2 else min(n_eval, 1000)
                res["c"][key] = diagnose_tv(st, teacher, grid, n=n_diag, seed=seed, mode="jump", verbose=False)
                if preset == "ring8" and variant == "reflow" and seed == seeds[0]:
                    res["a"]["ring8"] = ring8_underdetermination(st, method.pairs, n=n_eval, seed=seed)
                print(f"{key}: {sec * 1e3:.1f} ms/step, mmd2 " +
                      ", ".join(f"{k}:{v['mmd2']:.4g}" for k, v in ev.items()), flush=True)
                out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
    out.write_text(render(res, presets, [v + suffix for v in variants], seeds))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
    return res


def _mean(res: dict[str, Any], key: str, seeds: list[int], nfe: int, metric: str) -> float | None:
    vals = [float({str(a): b for a, b in res["b"][f"{key}/{s}"]["eval"].items()}[str(nfe)].get(metric, math.nan))
            for s in seeds if f"{key}/{s}" in res["b"]]
    vals = [v for v in vals if math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _std(res: dict[str, Any], key: str, seeds: list[int], nfe: int, metric: str) -> float:
    vals = [float({str(a): b for a, b in res["b"][f"{key}/{s}"]["eval"].items()}[str(nfe)].get(metric, math.nan))
            for s in seeds if f"{key}/{s}" in res["b"]]
    return statistics.pstdev(vals) if len(vals) > 1 else 0.0


def summary(res: dict[str, Any], presets: list[str], variants: list[str], seeds: list[int]) -> list[str]:
    """Plain statements computed from the results: MA deltas per method/NFE and the ring8 quality bar."""
    lines = ["### Summary (computed from the tables above)", ""]
    for preset in presets:
        pairs = [(b, v) for b in variants if "+MA" not in b for v in variants if v.startswith(b + "+MA")]
        for base, ma in pairs:
            for k in (1, 2, 4):
                m0 = _mean(res, f"{preset}/{base}", seeds, k, "mmd2")
                m1 = _mean(res, f"{preset}/{ma}", seeds, k, "mmd2")
                k0, k1 = _mean(res, f"{preset}/{base}", seeds, k, "kl"), _mean(res, f"{preset}/{ma}", seeds, k, "kl")
                if m0 is None or m1 is None:
                    continue
                noise = _std(res, f"{preset}/{base}", seeds, k, "mmd2") + _std(res, f"{preset}/{ma}", seeds, k, "mmd2")
                verdict = "helps" if m1 < 0.9 * m0 else ("does not help" if m1 > 1.1 * m0 else "is neutral (±10%)")
                if abs(m1 - m0) <= noise and verdict != "is neutral (±10%)":
                    verdict += " (but the difference is within the seed std)"
                kl = f"; KL {k0:.3f} -> {k1:.3f} (valid estimate, see est.)" if k0 is not None and k1 is not None \
                    else ""
                lines.append(f"- {preset}, {base} -> {ma}, {k} NFE: MMD² {m0:.4f} -> {m1:.4f}: "
                             f"MA {verdict} on MMD²{kl}.")
    te = res["teacher_euler"].get("ring8")
    if te and "ring8" in presets:
        e4, e8 = float(te.get("4", te.get(4))["mmd2"]), float(te.get("8", te.get(8))["mmd2"])
        best = {k: min(((_mean(res, f"ring8/{v}", seeds, k, "mmd2") or math.inf), v) for v in variants)
                for k in (1, 2)}
        lines.append(f"- ring8 quality bar: best at 2 steps {best[2][1]} {best[2][0]:.4f} vs teacher Euler 8 NFE "
                     f"{e8:.4f} ({'met' if best[2][0] < e8 else 'NOT met'}); best at 1 step {best[1][1]} "
                     f"{best[1][0]:.4f} vs teacher Euler 4 NFE {e4:.4f} ({'met' if best[1][0] < e4 else 'NOT met'}).")
    return lines + [""]


def render(res: dict[str, Any], presets: list[str], variants: list[str], seeds: list[int]) -> str:
    """The markdown report of :func:`run`'s results."""
    g = res["a"]["gaussian"]
    lines = ["# Reflow family with marginal alignment (issue 4)", "",
             "Generated by `python -m fewstep.benchmarks.reflow_experiments`; settings: "
             f"`{json.dumps(res['settings'], ensure_ascii=False)}`.", "",
             "Setup: analytic mixture teachers; MLP students trained with `fewstep.training.trainer.Trainer` "
             "(Adam, cosine LR, "
             "EMA 0.995, batch as in the settings); reflow pairs = 20k exact-teacher RK4-64 endpoints (4096 RK4-16 for "
             "digits); PeRFlow: 2 windows, data-noised window starts, RK4 window solves; MA = reverse-KL surrogate "
             "(`fewstep.methods._shared.alignment.ma_loss`) on 128 rows per step, "
             "switched on for the second half of training, "
             "window end clamped to t_min=0.05; mode `jump` in 2-D, Hutchinson (2 probes, one Euler sub-step) for "
             "reflow in 64-D. Metrics: `fewstep.evaluation.evaluate` (MMD² summed over bandwidths 0.05/0.2/1, exact "
             "mean log p₀ of the samples, KL(q‖p₀) and TV of the k-jump pushforward in 2-D, mode coverage); "
             "ms/step is wall time on a shared, heavily loaded 2-core CPU (MA is active on half of the steps).", "",
             "KL/TV (`fewstep.evaluation.valid_kl`): by importance sampling with the change-of-variables density "
             "(CoV) only when no sample's jump folds (det ∂f/∂x ≤ 0); otherwise the density-free k-NN estimates "
             "(k-NN entropy of the samples + exact log p₀, Kozachenko-Leonenko; TV with the k-NN density of q). "
             "`folded` = share of samples with a folded jump; `E_q[p/q]` = the density check (≤ 1 for a valid "
             "density, CoV density; mean over seeds); `est.` = CoV or k-NN (seeds using each). k-NN values of exact "
             "samples (floors) at n = 2000: KL ≈ 0.04, TV ≈ 0.14 on ring8.", "",
             "## a. Under-determination", "",
             "Teacher window map = identity on N(0, I₂) (docs/methods.md §4):", "",
             "| student | trajectory loss E‖Φ(x)−x‖² | KL(Φ#p ‖ p) |", "|---|---|---|",
             f"| rotation α=π/3 (flow of αJx, RK4) | {g['traj_loss_rotation']:.4f} | {g['kl_rotation']:.2e} |",
             f"| translation ‖c‖²=4(1−cos α) | {g['traj_loss_translation']:.4f} | {g['kl_translation']:.4f} |", ""]
    if "ring8" in res["a"]:
        r = res["a"]["ring8"]
        lines += ["Trained reflow student Φ on ring8 (seed 0), composed with a 45° rotation (A; ring8 is invariant) "
                  "or a translation (B) sized so both have the same endpoint loss E‖Φ(x₁)−x₀‖² on the teacher pairs:",
                  "", "| student | endpoint loss | MMD² (1 step) | mean log p₀ |", "|---|---|---|---|",
                  f"| A = R₄₅∘Φ | {r['loss_A_rotation']:.4f} | {r['mmd2_A']:.4f} | {r['loglik_A']:.3f} |",
                  f"| B = Φ + c (‖c‖={r['shift_norm']:.3f}) | {r['loss_B_translation']:.4f} | {r['mmd2_B']:.4f} | "
                  f"{r['loglik_B']:.3f} |", ""]
    lines += ["## b. MA vs no MA (EMA students, mean ± std over seeds " + ", ".join(map(str, seeds)) + ")", ""]
    for preset in presets:
        te = res["teacher_euler"].get(preset, {})
        lines += [f"### {preset}", "", "Teacher Euler: " + (", ".join(
            f"{k} NFE MMD² {v['mmd2']:.4f}" for k, v in te.items()) or "not measured (64-D)"), "",
            "| variant | NFE | MMD² | mean log p₀ | KL(q‖p₀) | TV | est. | folded | E_q[p/q] | modes covered | "
            "ms/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for variant in variants:
            runs = [res["b"][f"{preset}/{variant}/{s}"] for s in seeds if f"{preset}/{variant}/{s}" in res["b"]]
            if not runs:
                continue
            for k in ("1", "2", "4"):
                evs = [{str(kk): vv for kk, vv in r["eval"].items()}[k] for r in runs]
                col = lambda m: [float(e[m]) for e in evs if m in e]  # noqa: E731
                ms = [1e3 * r["sec_per_step"] for r in runs]
                lines.append(f"| {variant} | {k} | {_fmt(col('mmd2'))} | {_fmt(col('mean_loglik'))} | "
                             f"{_fmt(col('kl'))} | {_fmt(col('tv'))} | {_route(col('kl_from_cov'))} | "
                             f"{_fmt(col('fold_fraction'), 3)} | {_fmt(col('w_mean'), 3)} | "
                             f"{_fmt(col('modes_covered'), 3)} | {_fmt(ms, 3)} |")
        lines.append("")
    lines += summary(res, presets, variants, seeds)
    lines += ["## c. Telescoping bound TV(q₀, p₀) ≤ Σ ε_k ≤ Σ √(KL_k/2)", "",
              "Folding windows use the density-free k-NN ε_k (upward noise: `eps floor` summed over windows).", "",
              "| run | windows | TV(q₀,p₀) | Σ ε_k | Σ √(KL_k/2) | holds (2 s.e.) | max folded (window) | "
              "folded (final) | Σ eps floor |", "|---|---|---|---|---|---|---|---|---|"]
    for key, d in res["c"].items():
        terms = d["terms"]
        fold_w = max((t.get("fold_fraction", math.nan) for t in terms), default=math.nan)
        floor = sum(t.get("eps_floor", 0.0) for t in terms)
        lines.append(f"| {key} | {len(d['windows']) - 1} | {d['tv_final']:.4f} ± {d['tv_final_se']:.4f} | "
                     f"{d['sum_eps']:.4f} | {d['sum_sqrt_kl_half']:.4f} | {d['holds']} | {fold_w:.3f} | "
                     f"{d.get('final_fold_fraction', math.nan):.3f} | {floor:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["ring8", "aniso3", "digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--digits-steps", type=int, default=800)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--extra", default="{}", help="JSON {method: {cfg}} merged into every run of that method")
    p.add_argument("--suffix", default="", help="appended to variant names in the results (ablations)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--merge", nargs="+", default=[], help="only merge these result JSON files into --out")
    p.add_argument("--out", default="docs/results/reflow.md")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        settings = [q["settings"] for q in parts]
        res = parts[0]
        for extra_res in parts[1:]:
            for sec in ("a", "b", "c", "teacher_euler"):
                res[sec].update(extra_res[sec])
        res["settings"] = {"runs": settings}
        presets = list(dict.fromkeys(k.split("/")[0] for k in res["b"]))
        variants = list(dict.fromkeys(k.split("/")[1] for k in res["b"]))
        seeds = sorted({int(k.split("/")[2]) for k in res["b"]})
        out.write_text(render(res, presets, variants, seeds))
        out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
        return
    steps = {pr: (a.digits_steps if pr == "digits" else a.steps) for pr in a.presets}
    if a.quick:
        steps = {pr: 60 for pr in a.presets}
    run(a.presets, a.seeds, steps, out, a.hidden, a.depth, a.batch, a.n_eval, json.loads(a.extra), a.variants,
        a.suffix)


if __name__ == "__main__":
    main()
