r"""Trainer callbacks and run logging: metrics.csv + TensorBoard, periodic evaluation, sample figures.

A :class:`Callback` sees the trainer at four points (``on_fit_start``, ``on_step_end``, ``on_eval``,
``on_fit_end``). :class:`EvalCallback` calls ``fewstep.evaluation.evaluate.evaluate_flowmap(student, teacher, nfe, n,
seed)`` (e.g. MMD² and mean log-likelihood of 1/2/4-step samples of the EMA student) and writes
``evals.jsonl``; :class:`SampleFigureCallback` saves a PNG of samples vs target and 4-step trajectories.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fewstep.training.trainer import Trainer

__all__ = ["Callback", "CSVLogger", "EvalCallback", "SampleFigureCallback", "save_sample_figure"]


class Callback:
    """Base class: override any hook. Hooks run on every rank except ``on_eval`` (rank 0 only)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after resuming)."""

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        """After iteration ``step`` (0-based); ``logs`` holds this step's floats."""

    def on_eval(self, trainer: Trainer, step: int) -> None:
        """Every ``eval_every`` steps and at the end; ``step`` = completed steps."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step and the final checkpoint."""


class CSVLogger:
    """Rows of floats to ``metrics.csv`` (header grows when new keys appear) and to TensorBoard.

    Args:
        run_dir: Run folder.
        tensorboard: Also write TensorBoard event files under ``run_dir/tb`` (skipped if unavailable).
        start_step: When resuming, rows with step > start_step are dropped from an existing file.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, start_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists() and start_step > 0:
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= start_step]
        self.keys: list[str] = ["step"]
        for r in self.rows:
            self.keys += [k for k in r if k not in self.keys]
        self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step or None)
            except Exception:  # tensorboard missing or broken: CSV only
                self.writer = None

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.keys)
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, row: dict[str, float]) -> None:
        """Append one row (and one TensorBoard scalar per key)."""
        full = {"step": step, **row}
        self.rows.append(full)
        new = [k for k in full if k not in self.keys]
        if new:
            self.keys += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys).writerow(full)
        if self.writer is not None:
            for k, v in row.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


class EvalCallback(Callback):
    """Evaluate the (EMA) student against an analytic teacher with ``fewstep.evaluation.evaluate.evaluate_flowmap``.

    Args:
        teacher: The reference teacher (exact samples / log-density).
        nfe: Step counts to evaluate.
        n: Number of samples per evaluation.
        seed: Sampling seed (fixed, so evaluations are comparable over training).
        ema: Evaluate the EMA weights.
        sampler: The multi-step sampler (:class:`~fewstep.sampling.spec.SamplerSpec`); None = deterministic jumps.
    """

    def __init__(self, teacher: Any, nfe: Sequence[int] = (1, 2, 4), n: int = 2000, seed: int = 0,
                 ema: bool = True, sampler: Any = None) -> None:
        self.teacher, self.nfe, self.n, self.seed, self.ema = teacher, tuple(nfe), n, seed, ema
        self.sampler = sampler

    def on_eval(self, trainer: Trainer, step: int) -> None:
        try:
            from fewstep.evaluation.evaluate import evaluate_flowmap
        except ImportError:  # the evaluation module is optional
            return
        student = trainer.student(ema=self.ema)
        was_training = student.training
        student.eval()
        res = evaluate_flowmap(student, self.teacher, nfe=self.nfe, n=self.n, seed=self.seed, sampler=self.sampler)
        student.train(was_training)
        flat = {f"eval/nfe{k}/{m}": float(v) for k, d in res.items() for m, v in d.items()
                if isinstance(v, (int, float))}
        record = {"step": step, "results": {str(k): v for k, v in res.items()},
                  "sampler": None if self.sampler is None else self.sampler.to_dict()}
        trainer.eval_history.append(record)
        if trainer.logger is not None:
            trainer.logger.log(step, flat)
        if trainer.run_dir is not None:
            with open(trainer.run_dir / "evals.jsonl", "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


class SampleFigureCallback(Callback):
    """Save ``samples-<step>.png``: target samples, 1..N-step student samples, and 4-step trajectories.

    Args:
        target: Callable ``n -> Tensor (n, 2)`` of reference samples (e.g. a teacher's exact ``sample``).
        nfe: Step counts shown.
        n: Points per panel.
        seed: Noise seed.
        sampler: The multi-step sampler (:class:`~fewstep.sampling.spec.SamplerSpec`); None = deterministic jumps.
    """

    def __init__(self, target: Any, nfe: Sequence[int] = (1, 2, 4), n: int = 1000, seed: int = 0,
                 sampler: Any = None) -> None:
        self.target, self.nfe, self.n, self.seed, self.sampler = target, tuple(nfe), n, seed, sampler

    def on_eval(self, trainer: Trainer, step: int) -> None:
        if trainer.run_dir is None:
            return
        save_sample_figure(trainer.student(ema=True), self.target, trainer.run_dir / f"samples-{step}.png",
                           nfe=self.nfe, n=self.n, seed=self.seed, title=f"step {step}", sampler=self.sampler)


@torch.no_grad()
def save_sample_figure(flowmap: Any, target: Any, path: str | Path, nfe: Sequence[int] = (1, 2, 4),
                       n: int = 1000, seed: int = 0, title: str = "", cond: torch.Tensor | None = None,
                       sampler: Any = None) -> Path:
    """PNG with target samples, ``f`` sampled with each NFE (x_{i+1} = f_{t_i->t_{i+1}}(x_i)), and trajectories.

    ``sampler`` (:class:`~fewstep.sampling.spec.SamplerSpec`, default deterministic jumps) is the multi-step rule.

    Only the first two coordinates are drawn (2-D toy data). ``target`` is a callable ``n -> (n, d)``
    or a tensor of reference samples.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewstep.sampling.spec import DETERMINISTIC, sample_with

    spec = DETERMINISTIC if sampler is None else sampler
    device = next(flowmap.parameters()).device if hasattr(flowmap, "parameters") else torch.device("cpu")
    event = tuple(getattr(getattr(flowmap, "net", None), "event_shape", (2,)))
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, *event, generator=g).to(device)
    ref = target if torch.is_tensor(target) else target(n)
    panels = len(nfe) + 2
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3), squeeze=False)
    ax = axes[0]
    ref2 = ref.reshape(ref.shape[0], -1)[:, :2].cpu()
    lim = float(ref2.abs().max()) * 1.3 + 1e-3
    ax[0].scatter(ref2[:, 0], ref2[:, 1], s=2, c="k")
    ax[0].set_title("target")
    for i, k in enumerate(nfe):
        x = sample_with(flowmap, x1, spec, int(k), cond=cond, seed=seed).x.reshape(n, -1)[:, :2].cpu()
        ax[i + 1].scatter(x[:, 0], x[:, 1], s=2, c="C0")
        ax[i + 1].set_title(f"{k} step{'s' if k > 1 else ''}")
    res = sample_with(flowmap, x1[:64], spec, max(nfe), cond=None if cond is None else cond[:64], seed=seed,
                      return_trajectory=True)
    traj = torch.stack([t.reshape(t.shape[0], -1)[:, :2].cpu() for t in res.trajectory or []])
    ax[-1].plot(traj[:, :, 0].numpy(), traj[:, :, 1].numpy(), lw=0.6, c="C1")
    ax[-1].scatter(traj[-1, :, 0], traj[-1, :, 1], s=4, c="C0")
    ax[-1].set_title(f"trajectories ({max(nfe)} steps)")
    for a in ax:
        a.set_xlim(-lim, lim)
        a.set_ylim(-lim, lim)
        a.set_aspect("equal")
        a.set_xticks([])
        a.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
