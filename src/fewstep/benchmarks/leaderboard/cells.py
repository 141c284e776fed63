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

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.benchmarks.leaderboard.learned import is_learned_target, learned_overrides
from fewstep.benchmarks.leaderboard.targets import STUDENT_NFE, load_target, sample_metrics, target_reference
from fewstep.config.build import build_run, resolve_sampler
from fewstep.config.schema import RunConfig, load_config, to_dict
from fewstep.core.flowmap import FlowMap
from fewstep.evaluation.evaluate import noise
from fewstep.methods.registry import get_method
from fewstep.sampling.spec import sample_with
from fewstep.training.callbacks import Callback

__all__ = ["Budget", "CONFIG_DIR", "cell_config", "run_cell", "design_limits", "shipped_design_limits"]

CONFIG_DIR = Path(__file__).resolve().parents[4] / "configs"


@dataclass(frozen=True)
class Budget:
    """The common budget of every cell (same student size, same number of training steps and batch).

    Attributes:
        steps: Training steps.
        batch_size: Global batch per step.
        hidden: MLP width.
        depth: MLP hidden layers.
        n: Evaluation samples (and reference samples).
        probes: Evaluations during training (the last at the final step), for the time to reach the bar.
    """

    steps: int = 2000
    batch_size: int = 512
    hidden: int = 256
    depth: int = 4
    n: int = 2000
    probes: int = 4

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 2), ("hidden", 1), ("depth", 1), ("n", 100), ("probes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"bench {name} must be an int >= {lo}; got {v!r}")

    def tag(self) -> str:
        """Folder name of this budget's cells, e.g. ``s2000-b512-h256x4-n2000-p4``."""
        return f"s{self.steps}-b{self.batch_size}-h{self.hidden}x{self.depth}-n{self.n}-p{self.probes}"

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON."""
        return asdict(self)


def config_path(method: str, config_dir: Path = CONFIG_DIR) -> Path | None:
    """``configs/<method>.yaml`` if it exists, else None (the method's defaults)."""
    p = Path(config_dir) / f"{method}.yaml"
    return p if p.is_file() else None


def cell_overrides(method: str, target: str, seed: int, budget: Budget) -> list[str]:
    """The dotted overrides that put a shipped config on ``target`` at ``budget`` (nothing else changes).

    A method with teacher ODE pairs (the reflow family: ``pair_seed``) gets ``pair_seed`` = the cell seed, so the
    seeds of a cell are independent in their pairs too (the config default is 0 for every run seed).
    """
    every = max(budget.steps // budget.probes, 1)
    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    pairs = [f"method.cfg.pair_seed={seed}"] if "pair_seed" in fields else []
    if is_learned_target(target):
        source = learned_overrides(target)
    else:
        source = [
            "teacher.kind=preset",
            f"teacher.name={target}",
            "teacher.conditional=false",
            "teacher.guidance=1.0",
            "data.name=teacher",
            "data.kwargs={}",
        ]
    return [
        f"method.name={method}",
        f"seed={seed}",
        "device=cpu",
        *source,
        *pairs,
        f"student.hidden={budget.hidden}",
        f"student.depth={budget.depth}",
        f"train.steps={budget.steps}",
        f"train.batch_size={budget.batch_size}",
        f"train.eval_every={every}",
        "train.ckpt_every=0",
        "train.progress=false",
        "train.tensorboard=false",
    ]  # eval.nfe stays the config's (design_limits reads it); the trainer's own eval is off (with_eval=False)


def cell_config(
    method: str, target: str, seed: int, budget: Budget, config_dir: Path = CONFIG_DIR, extra: tuple = ()
) -> RunConfig:
    """The run config of a cell: ``configs/<method>.yaml`` (or defaults) + :func:`cell_overrides` + ``extra``."""
    get_method(method)
    over = cell_overrides(method, target, seed, budget) + list(extra)
    return load_config(config_path(method, config_dir), over, base={"method": {"name": method}})


def design_limits(cfg: RunConfig) -> dict[int, str]:
    """NFE counts at which a config cannot meet its bar by design, with the reason (from the config itself).

    * a window method (PeRFlow, ``num_windows`` W) takes one Euler jump per window: K < W NFE skips windows;
    * a one-step generator (``n_steps: 1`` of the DMD family, or a config that evaluates only ``nfe: [1]``)
      does not claim multi-step sampling.
    """
    mcfg = get_method(cfg.method.name).make_config(**dict(cfg.method.cfg))
    out: dict[int, str] = {}
    explicit = getattr(mcfg, "windows", None)
    windows = len(explicit) - 1 if explicit else getattr(mcfg, "num_windows", None)
    if windows is not None:
        for k in STUDENT_NFE:
            if k < windows:
                out[k] = (
                    f"one Euler jump per window and num_windows={windows}: {k} NFE cannot cover the "
                    f"{windows} windows (by design)"
                )
    one_step = getattr(mcfg, "n_steps", None) == 1 and cfg.method.name.startswith("dmd")
    if one_step or list(cfg.eval.nfe) == [1]:
        for k in STUDENT_NFE:
            if k > 1:
                out[k] = "one-step generator: multi-step sampling is not claimed by the config"
    return out


def shipped_design_limits(method: str, config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """:func:`design_limits` of the method's shipped config as it is now (string keys, as stored in cells)."""
    cfg = load_config(config_path(method, config_dir), base={"method": {"name": method}})
    return {str(k): v for k, v in design_limits(cfg).items()}


class _Counter:
    """Rows evaluated by the method's networks and by the teacher, while ``active``."""

    def __init__(self, method: nn.Module, teacher: Any) -> None:
        from fewstep.networks.mlp import MLP

        self.net_rows = self.teacher_rows = 0
        self.active = True
        self.handles, seen = [], set()
        for m in method.modules():
            net = m.net if isinstance(m, FlowMap) else m if isinstance(m, MLP) else None
            if net is not None and id(net) not in seen:
                seen.add(id(net))
                self.handles.append(net.register_forward_hook(self._net_hook))
        self.teacher = teacher
        if teacher is not None:
            inner = teacher.velocity

            def counted(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
                if self.active:
                    self.teacher_rows += int(x.shape[0])
                return inner(x, *a, **k)

            teacher.velocity = counted

    def _net_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.active and args:
            self.net_rows += int(args[0].shape[0])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.teacher is not None and "velocity" in vars(self.teacher):
            del self.teacher.velocity


class _Probe(Callback):
    """At every trainer evaluation: sample the EMA student at 1/2/4 NFE with the run's sampler; time excluded."""

    def __init__(self, target: str, teacher: Any, spec: Any, seed: int, n: int, counter: _Counter) -> None:
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
    from fewstep.benchmarks.leaderboard.init import cell_init  # Method.needs_init: e.g. a flow-matching init

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
    counter = _Counter(trainer.method, getattr(trainer.method, "teacher", None))
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
