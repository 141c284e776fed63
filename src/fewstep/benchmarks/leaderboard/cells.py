r"""One leaderboard cell: a method's shipped config trained on one target and seed at the common budget.

The run config is exactly what ``fewstep distill --config configs/<method>.yaml`` loads
(:func:`fewstep.config.schema.load_config`, built by :func:`fewstep.config.build.build_run`), with overrides that
only set the target and the common budget: ``teacher`` = the target's unconditional, unguided analytic mixture
(``data.name=teacher``: exact mixture samples) or, on a learned target, the cached run folder of its teacher
(``teacher.kind=run``, data = the real digits it was trained on; :mod:`~fewstep.benchmarks.leaderboard.learned`),
``student.hidden`` / ``student.depth``, ``train.steps`` and
``train.batch_size``, ``seed``. Every other key (method hyper-parameters, learning rate and schedule, EMA, time
embedding) is the shipped config's. A method without a config file (``flow_matching``) runs with its defaults.

During training a callback (the trainer's ``eval_every`` hook) samples the EMA student with the run's own sampler
(:func:`fewstep.config.build.resolve_sampler`: config ``sampler`` section, else ``Method.sampler``) at 1, 2 and 4
NFE, ``probes`` times in all (the last at the final step); the wall time at each probe excludes the probes
themselves, so "time to reach the bar" is the training time (plus ``method.prepare``, e.g. reflow's pair
generation) at the first probe that beats the bar. Forward hooks count the rows evaluated by every network of the
method (student, fake score, target copies) and by the teacher, per training sample and step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.leaderboard.cell_setup import (
    CONFIG_DIR,
    Budget,
    EvalCounter,
    cell_config,
    cell_overrides,
    config_path,
    design_limits,
    shipped_design_limits,
)
from fewstep.benchmarks.leaderboard.init import cell_init
from fewstep.benchmarks.leaderboard.targets import STUDENT_NFE, load_target, sample_metrics, target_reference
from fewstep.config.build import build_run, resolve_sampler
from fewstep.config.schema import to_dict
from fewstep.evaluation.evaluate import noise
from fewstep.sampling.spec import sample_with
from fewstep.training.callbacks import Callback

# the setup names stay importable from here (cell_setup holds them)
__all__ = ["Budget", "CONFIG_DIR", "cell_config", "run_cell", "design_limits", "shipped_design_limits"]


class _Probe(Callback):
    """At every trainer evaluation: sample the EMA student at 1/2/4 NFE with the run's sampler; time excluded."""

    def __init__(self, target: str, teacher: Any, spec: Any, seed: int, n: int, counter: EvalCounter) -> None:
        self.spec, self.seed, self.counter = spec, seed, counter
        self.x1 = noise(n, teacher, seed).float()
        self.ref = target_reference(target, teacher, n, seed)
        self.records: list[dict[str, Any]] = []
        self.t0 = self.excluded = 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self.t0, self.excluded = time.perf_counter(), 0.0

    def on_eval(self, trainer: Any, step: int) -> None:
        start = time.perf_counter()
        self.counter.active = False
        student = trainer.student(ema=True)
        was = student.training
        student.eval()
        res: dict[str, Any] = {}
        for k in STUDENT_NFE:
            sample_with(student, self.x1[:8], self.spec, nfe=k, seed=self.seed)  # warm-up, not timed
            ts = time.perf_counter()
            x = sample_with(student, self.x1, self.spec, nfe=k, seed=self.seed).x
            dt = time.perf_counter() - ts
            res[str(k)] = {**sample_metrics(x, self.ref), "sample_s": dt}
        student.train(was)
        self.records.append({"step": step, "train_s": start - self.t0 - self.excluded, "nfe": res})
        self.counter.active = True
        self.excluded += time.perf_counter() - start


def run_cell(
    method: str, target: str, seed: int, budget: Budget, bars: dict[str, Any], config_dir: Path = CONFIG_DIR
) -> dict[str, Any]:
    """Train and evaluate one cell; returns its JSON-able record (``status`` ok, or failed with the error).

    Args:
        method: Registered method name.
        target: Target name (:func:`fewstep.benchmarks.leaderboard.targets.load_target`).
        seed: Training and evaluation seed.
        budget: The common budget.
        bars: The target's teacher Euler record (:func:`~fewstep.benchmarks.leaderboard.targets.teacher_curve`).
        config_dir: Folder of the shipped configs.

    Returns:
        The cell record: config used, sampler, per-probe metrics, final metrics, timings, evaluation counts and
        the time at which each NFE first beat its 4x Euler bar.
    """
    init = cell_init(method, target, seed, budget, config_dir)
    extra = () if init is None else (f"student.init_from={init.pop('folder')}",)
    cfg = cell_config(method, target, seed, budget, config_dir, extra)
    rec: dict[str, Any] = {
        "method": method,
        "target": target,
        "seed": seed,
        "budget": budget.to_dict(),
        "config": str(config_path(method, config_dir) or "defaults"),
        "overrides": cell_overrides(method, target, seed, budget) + list(extra),
        "design_limits": shipped_design_limits(method, config_dir),
        **({} if init is None else {"init": init}),
    }
    torch.set_num_threads(1)
    spec = resolve_sampler(cfg)
    rec["sampler"] = spec.describe()
    teacher = load_target(target)  # first: trains a learned target's teacher when it is not cached
    trainer = build_run(cfg, device="cpu", run_dir=None, with_eval=False)
    counter = EvalCounter(trainer.method, getattr(trainer.method, "teacher", None))
    probe = _Probe(target, teacher, spec, seed, budget.n, counter)
    trainer.callbacks.append(probe)
    t0 = time.perf_counter()
    try:
        trainer.prepare()
        prepare_s = time.perf_counter() - t0 + (init["train_s"] if init else 0.0)  # the init's training too
        prep_net, prep_teacher = counter.net_rows, counter.teacher_rows
        counter.net_rows = counter.teacher_rows = 0
        trainer.fit()
    except (FloatingPointError, RuntimeError, ValueError) as e:
        counter.close()
        return {**rec, "status": "failed", "error": f"{type(e).__name__}: {e}", "resolved": to_dict(cfg)}
    counter.close()
    final = probe.records[-1]
    rows = budget.steps * budget.batch_size
    rec.update(
        status="ok",
        resolved=to_dict(cfg),
        prepare_s=prepare_s,
        train_s=final["train_s"],
        step_s=final["train_s"] / budget.steps,
        prepare_teacher_evals=prep_teacher,
        prepare_net_evals=prep_net,
        net_evals_per_sample=counter.net_rows / rows,
        teacher_evals_per_sample=counter.teacher_rows / rows,
        probes=probe.records,
        final={k: v for k, v in final["nfe"].items()},
        throughput={k: budget.n / max(v["sample_s"], 1e-9) for k, v in final["nfe"].items()},
    )
    ttb: dict[str, float | None] = {}
    for k in STUDENT_NFE:
        bar = bars["euler"][str(4 * k)]["mmd2"]
        hit = next((p for p in probe.records if p["nfe"][str(k)]["mmd2"] < bar), None)
        ttb[str(k)] = None if hit is None else prepare_s + hit["train_s"]
    rec["time_to_bar_s"] = ttb
    return rec
