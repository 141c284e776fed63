r"""Reflow-family experiments (issue 4): under-determination, MA vs no MA, and the telescoping TV bound.

a. Under-determination (docs/methods.md §4; :mod:`fewstep.benchmarks.reflow_underdetermination`): equal
   trajectory loss, different marginals, on N(0, I₂) and on a trained ring8 reflow student.
b. reflow, reflow+MA, perflow, perflow+MA at equal steps on ring8, aniso3, digits (64-D) at 1/2/4 NFE: MMD²,
   mean exact log p_0 of the samples, exact KL (2-D), mode coverage; mean ± std over seeds; time per step.
c. :func:`fewstep.evaluation.diagnose.diagnose_tv` for every trained student of (b).

The markdown tables are :mod:`fewstep.benchmarks.reflow_report`.

Run: ``python -m fewstep.benchmarks.reflow_experiments --out docs/results/reflow.md`` (add ``--quick`` for a
smoke run). Writes markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.reflow_report import render
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
