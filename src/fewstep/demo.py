r"""``fewstep demo``: distill the analytic ring8 teacher with reflow and with reflow + marginal alignment.

Each student is trained with the library's :class:`~fewstep.training.trainer.Trainer` (reflow: flow matching on cached
teacher ODE pairs, :math:`L = E\|v_\theta(x_t,t) - (x_1 - x_0)\|^2`, plus :math:`\lambda L_{MA}` for the MA
variant), then sampled with 1, 2 and 4 steps and compared with the exact teacher integrated by Euler at the same
NFE and by an adaptive solver (the reference). Quality is MMD² (unbiased RBF, bandwidths {0.05, 0.2, 1}, 2000 vs
2000 samples) and the exact mean log-likelihood log p_0 of the samples (higher is better; exact ring8 samples
score about the entropy bound). Budgeted for < 3 minutes on 2 CPU cores; edit :data:`DEMO_METHODS` to change
what is compared.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_METHODS", "DEMO_STEPS", "run_demo"]

#: (label, registered method name, method hyper-parameters) of every student the demo trains. A callable value
#: is called with the number of training steps (MA is switched on for the second half, as in
#: fewstep.benchmarks.reflow_experiments).
DEMO_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("reflow", "reflow", {}),
    ("reflow+MA", "reflow", {"ma_weight": 0.0003, "ma_warmup": lambda steps: steps // 2, "ma_t_min": 0.05,
                             "ma_batch": 128}),
]
#: Fallback when ``reflow`` is not registered: a 1-rectified-flow student trained by flow matching.
FALLBACK_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("1-RF (flow_matching)", "flow_matching", {"cond_drop": 0.0}),
]
DEMO_STEPS = 1500
NFES = (1, 2, 4)


def _methods() -> tuple[list[tuple[str, str, dict[str, Any]]], str]:
    from fewstep.methods import list_methods

    names = list_methods()
    chosen = [m for m in DEMO_METHODS if m[1] in names]
    if chosen:
        return chosen, ""
    return FALLBACK_METHODS, "note: method 'reflow' is not registered; showing a flow_matching (1-RF) student"


def run_demo(out_dir: str | Path = "runs/demo", steps: int | None = None, seed: int = 0,
             threads: int = 1, n_eval: int = 2000, verbose: bool = True) -> dict[str, Any]:
    """Train every demo student on ring8, evaluate at 1/2/4 NFE next to the teacher, write table + figure.

    Args:
        out_dir: Folder for run folders, ``demo.json``, ``demo.md`` and ``demo.png``.
        steps: Training steps per student (default :data:`DEMO_STEPS`).
        seed: Seed of training and evaluation.
        threads: torch CPU threads.
        n_eval: Samples per evaluation.
        verbose: Print progress and the table.

    Returns:
        ``{"rows": {label: {nfe: {metric: value}}}, "files": {...}, "seconds": ...}``.
    """
    from fewstep.config.build import build_run, resolve_sampler
    from fewstep.config.schema import SamplerConfig, load_config, save_config
    from fewstep.evaluation.evaluate import noise, reference_samples
    from fewstep.sampling.samplers import solve, solve_adaptive
    from fewstep.sampling.spec import sample_with
    from fewstep.teachers.presets import load_preset
    from fewstep.training.callbacks import save_sample_figure
    from fewstep.training.checkpoint import clear_run

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = DEMO_STEPS if steps is None else int(steps)
    methods, note = _methods()
    say = print if verbose else (lambda *a, **k: None)
    teacher = load_preset("ring8")
    x1 = noise(n_eval, teacher, seed)  # the same noise and reference as fewstep.evaluation.evaluate.evaluate_flowmap
    ref = reference_samples(teacher, n_eval, seed)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    students = {}
    specs = {}
    for label, name, hp in methods:
        t0 = time.perf_counter()
        cfg_hp = {k: v(steps) if callable(v) else v for k, v in hp.items()}
        if name == "reflow":
            cfg_hp.update({"n_pairs": 8192, "pair_dir": str(out / "pairs")})
        overrides = [f"method.name={name}", "device=cpu", f"seed={seed}", f"train.steps={steps}",
                     "train.batch_size=256", "train.lr=2.0e-3", "train.warmup_steps=50", "train.lr_schedule=cosine",
                     "train.min_lr_ratio=0.05", "train.ema_decays=[0.99]", "train.log_every=100",
                     "train.progress=false", "train.tensorboard=false", "student.hidden=128", "student.depth=3",
                     "student.emb_dim=32", f"eval.n_samples={n_eval}"]
        if name == "flow_matching":
            overrides.append("data.name=ring8")
        cfg = load_config(None, overrides, base={"method": {"name": name, "cfg": cfg_hp}})
        run_dir = out / label.replace("+", "_").replace(" ", "_").replace("(", "").replace(")", "")
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_run(run_dir)  # the demo replaces its own previous run
        spec = specs[label] = resolve_sampler(cfg)  # each method's own multi-step sampler
        cfg.sampler = SamplerConfig(gamma=spec.gamma, grid=spec.grid)
        save_config(cfg, run_dir / "config.yaml")
        trainer = build_run(cfg, device="cpu", run_dir=run_dir, with_eval=False)
        trainer.fit()
        student = trainer.student(ema=True).eval()
        students[label] = student
        rows[label] = {k: _quality(sample_with(student, x1.float(), spec, k, seed=seed).x, teacher, ref)
                       for k in NFES}
        say(f"trained {label} ({name}, {steps} steps) in {time.perf_counter() - t0:.1f} s -> {run_dir}")
    rows["teacher Euler"] = {k: _quality(solve(teacher.velocity, x1, k, "euler").x, teacher, ref) for k in NFES}
    adaptive = solve_adaptive(teacher.velocity, x1, rtol=1e-5, atol=1e-5)
    reference = _quality(adaptive.x, teacher, ref) | {"nfe": float(adaptive.nfe)}
    table = _table(rows, reference, steps, note)
    say(table)
    fig = out / "demo.png"
    target = teacher.sample(n_eval, generator=torch.Generator().manual_seed(seed + 1))
    for label, student in students.items():
        save_sample_figure(student, target, out / f"samples-{label.replace('+', '_').split()[0]}.png", nfe=NFES,
                           n=1000, seed=seed, title=label, sampler=specs[label])
    _comparison_figure(students, specs, target, fig, seed)
    (out / "demo.md").write_text(table + "\n")
    seconds = time.perf_counter() - t_start
    result = {"rows": {lab: {str(k): v for k, v in r.items()} for lab, r in rows.items()}, "reference": reference,
              "steps": steps, "seed": seed, "note": note, "seconds": seconds,
              "files": {"table": str(out / "demo.md"), "json": str(out / "demo.json"), "figure": str(fig)}}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    say(f"\nfiles: table {out / 'demo.md'}, metrics {out / 'demo.json'}, figure {fig}; run folders under {out}/")
    say(f"total {seconds:.0f} s")
    return result


@torch.no_grad()
def _quality(x: torch.Tensor, teacher: Any, ref: torch.Tensor) -> dict[str, float]:
    """MMD² of samples vs exact reference samples, and their exact mean log p_0."""
    from fewstep.evaluation.metrics import mean_loglik, mmd2

    x = x.detach().to(torch.float64)
    return {"mmd2": float(mmd2(x, ref)), "mean_loglik": float(mean_loglik(x, teacher))}


def _table(rows: dict[str, dict[int, dict[str, float]]], reference: dict[str, float], steps: int, note: str) -> str:
    head = "| sampler | " + " | ".join(f"MMD² {k} NFE" for k in NFES) + " | " + \
        " | ".join(f"log-lik {k} NFE" for k in NFES) + " |"
    lines = [f"ring8, {steps} training steps per student; MMD² lower is better, mean log p_0 higher is better.",
             *([note] if note else []), "", head, "|" + "---|" * (1 + 2 * len(NFES))]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[k]['mmd2']:.4f}" for k in NFES) + " | "
                     + " | ".join(f"{r[k]['mean_loglik']:.3f}" for k in NFES) + " |")
    lines.append(f"| teacher adaptive (dopri5, {reference['nfe']:.0f} NFE) | "
                 + " | ".join(f"{reference['mmd2']:.4f}" for _ in NFES) + " | "
                 + " | ".join(f"{reference['mean_loglik']:.3f}" for _ in NFES) + " |")
    return "\n".join(lines)


def _comparison_figure(students: dict[str, Any], specs: dict[str, Any], target: torch.Tensor, path: Path,
                       seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewstep.sampling.spec import sample_with

    x1 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(len(students), len(NFES) + 1, figsize=(3 * (len(NFES) + 1), 3 * len(students)),
                             squeeze=False)
    for i, (label, student) in enumerate(students.items()):
        axes[i, 0].scatter(target[:, 0], target[:, 1], s=2, c="k")
        axes[i, 0].set_title("ring8 (exact)")
        axes[i, 0].set_ylabel(label)
        with torch.no_grad():
            for j, k in enumerate(NFES):
                x = sample_with(student, x1, specs[label], k, seed=seed).x
                axes[i, j + 1].scatter(x[:, 0], x[:, 1], s=2, c="C0")
                axes[i, j + 1].set_title(f"{label}: {k} NFE")
        for a in axes[i]:
            a.set_xlim(-3, 3)
            a.set_ylim(-3, 3)
            a.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
