r"""The reflow family's shared machinery: the marginal-alignment (MA) and pair options, cached teacher pairs, and
the MA term :math:`\lambda L_{MA}` (:func:`fewstep.methods._shared.alignment.ma_loss`) added by reflow,
reflow_distill and perflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.utils import set_unregistered
from fewstep.methods._shared.alignment import EXACT_DIM, MA_MODES, ma_loss
from fewstep.methods._shared.pairs import Pairs, PairSolver, ensure_pairs, generate_pairs
from fewstep.methods.base import U_SELECT, Batch, Method, MethodConfig
from fewstep.teachers.fingerprint import teacher_fingerprint

__all__ = ["MAOptions", "PairOptions", "PairMethod", "ma_term", "add_ma"]


@dataclass
class MAOptions(MethodConfig):
    """Marginal-alignment options shared by reflow, reflow_distill and perflow.

    Attributes:
        ma_weight: lambda; 0 disables MA.
        ma_mode: ``ode`` (the student's velocity ODE over the window with its log-density: exact divergence up
            to ``ma_exact_dim`` entries per sample, Hutchinson above), ``exact``, ``hutchinson``, or ``jump``
            (log-det of the student's discrete jumps; valid only where the jumps are injective).
        ma_substeps: M sub-steps per window.
        ma_solver: Sub-step integrator of the ODE modes (euler/heun/rk4).
        ma_t_min: epsilon, the smallest time at which the teacher score is evaluated: the student runs to the
            exact window end; a window ending below epsilon is scored against its teacher marginal smoothed by
            a Gaussian (docs/methods.md §6; at t_e = 0 on the linear path: std epsilon/(1-epsilon)).
        ma_probes: Hutchinson probes K (held fixed along the path).
        ma_exact_dim: Largest sample size (entries) for which ``ode`` takes the exact divergence.
        ma_every: Apply MA every this many steps.
        ma_batch: Rows of the batch used for MA (0 = all).
        ma_warmup: First step at which MA is applied.
        guidance: Teacher CFG weight (of the pairs or window solves, and of the MA score).
    """

    ma_weight: float = 0.0
    ma_mode: str = "ode"
    ma_substeps: int = 4
    ma_solver: str = "rk4"
    ma_t_min: float = 0.02
    ma_probes: int = 4
    ma_exact_dim: int = EXACT_DIM
    ma_every: int = 1
    ma_batch: int = 256
    ma_warmup: int = 0
    guidance: float = 1.0

    def check_ma(self) -> None:
        """Raise ValueError naming a bad MA option."""
        if self.ma_mode not in MA_MODES:
            raise ValueError(f"unknown ma_mode {self.ma_mode!r}; expected one of {MA_MODES}")
        for key in ("ma_substeps", "ma_probes", "ma_every", "ma_exact_dim"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1; got {getattr(self, key)}")
        if self.ma_weight < 0 or not 0.0 < self.ma_t_min < 1.0 or self.ma_batch < 0:
            raise ValueError(f"need ma_weight >= 0, 0 < ma_t_min < 1, ma_batch >= 0; got {self.ma_weight}, "
                             f"{self.ma_t_min}, {self.ma_batch}")


@dataclass
class PairOptions(MAOptions):
    """Pair-generation options (see :mod:`fewstep.methods._shared.pairs`).

    Attributes:
        n_pairs: Number of cached pairs.
        pair_dir: Cache folder; empty = ``<run_dir>/pairs`` when a run folder exists, else in memory.
        pair_solver: ``euler``/``heun``/``rk4``/``adaptive``.
        pair_steps: Steps of a fixed-step pair solve.
        pair_rtol: Adaptive relative tolerance.
        pair_atol: Adaptive absolute tolerance.
        pair_seed: Seed of the pair noise.
        shard_size: Pairs per shard.
        uncond_fraction: Fraction of unconditional labels among the pairs of a conditional teacher.
        allow_stale_pairs: Reuse cached pairs even if teacher/solver differ (explicit override).
    """

    n_pairs: int = 20000
    pair_dir: str = ""
    pair_solver: str = "rk4"
    pair_steps: int = 32
    pair_rtol: float = 1e-5
    pair_atol: float = 1e-5
    pair_seed: int = 0
    shard_size: int = 8192
    uncond_fraction: float = 0.0
    allow_stale_pairs: bool = False


def ma_term(student: Any, teacher: Any, cfg: MAOptions, x_start: Tensor, t_start: Tensor | float,
            t_end: Tensor | float, cond: Tensor | None, step: int,
            score_teacher: Any = None) -> tuple[Tensor | None, dict[str, float]]:
    r"""The marginal-alignment term :math:`\lambda L_{MA}` on the first ``ma_batch`` rows, or None when it is off.

    MA is applied when :math:`\lambda` = ``ma_weight`` > 0, ``step >= ma_warmup`` and ``step % ma_every == 0``.
    Every row is aligned at its exact window end (``ma_t_min`` only sets where the teacher score is taken).

    Args:
        student: The student flow map.
        teacher: The teacher whose score is the MA target (unless ``score_teacher`` is given).
        cfg: The MA options.
        x_start: Window start points, shape (B, ...).
        t_start: Window start times (float or shape (B,)).
        t_end: Window end times (float or shape (B,)).
        cond: Class labels or None.
        step: Training step.
        score_teacher: The teacher whose score is aligned to (k-rectified flow: the original teacher).

    Returns:
        (lambda * L_MA or None, logs with ``ma`` and, when computed, ``ma_kl`` and (jump mode) ``ma_folded``).
    """
    if cfg.ma_weight <= 0 or step < cfg.ma_warmup or step % cfg.ma_every:
        return None, {}
    n = cfg.ma_batch or x_start.shape[0]
    x, c = x_start[:n], None if cond is None else cond[:n]
    ts = t_start[:n] if torch.is_tensor(t_start) and t_start.dim() else t_start
    te = t_end[:n] if torch.is_tensor(t_end) and t_end.dim() else t_end
    res = ma_loss(student, teacher, x, ts, te, c, mode=cfg.ma_mode, substeps=cfg.ma_substeps, solver=cfg.ma_solver,
                  num_probes=cfg.ma_probes, t_min=cfg.ma_t_min, guidance=cfg.guidance, score_teacher=score_teacher,
                  exact_dim=cfg.ma_exact_dim)
    logs = {"ma": float(res.loss.detach())}
    if res.kl is not None:
        logs["ma_kl"] = float(res.kl)
    if res.folded is not None:  # jump mode: share of rows whose jump folds (there Δ is not a log-density)
        logs["ma_folded"] = res.folded
    return cfg.ma_weight * res.loss, logs


def add_ma(loss: Tensor, logs: dict[str, float],
           term: tuple[Tensor | None, dict[str, float]]) -> tuple[Tensor, dict[str, float]]:
    """``loss + lambda L_MA`` (when the term is on) with its logs merged and the total logged as ``loss``."""
    ma, ma_logs = term
    if ma is not None:
        loss = loss + ma
    logs.update(ma_logs)
    logs["loss"] = float(loss.detach())
    return loss, logs


class PairMethod(Method):
    """Shared pair handling and the MA term of the reflow family."""

    needs_teacher = True
    needs_data = False

    def __init__(self, student: Any, teacher: Any = None, config: Any = None) -> None:
        super().__init__(student, teacher, config)
        self.config.check_ma()
        self.solver = PairSolver(self.config.pair_solver, self.config.pair_steps, self.config.pair_rtol,
                                 self.config.pair_atol)
        self.pairs: Pairs | None = None
        set_unregistered(self, "score_teacher", None)  # set to the original teacher for k-rectified flow

    def set_score_teacher(self, teacher: Any) -> None:
        """Use ``teacher``'s score / log_prob as the MA target (k-RF: the original teacher); kept out of the
        module tree so it is never trained or saved."""
        if teacher is not None and isinstance(teacher, torch.nn.Module):
            teacher.eval().requires_grad_(False)
        set_unregistered(self, "score_teacher", teacher)

    def prepare(self, context: dict[str, Any]) -> None:
        """Generate, resume or load the cached pairs (rank 0 writes; other ranks wait and load)."""
        cfg = self.config
        folder = Path(cfg.pair_dir) if cfg.pair_dir else (
            Path(context["run_dir"]) / "pairs" if context.get("run_dir") else None)
        # an unconditional student of a class-conditional teacher gets unconditional pairs (labels -1)
        uncond = 1.0 if getattr(self.teacher, "num_classes", None) and self.pair_classes() is None \
            else cfg.uncond_fraction
        kw = dict(seed=cfg.pair_seed, guidance=cfg.guidance, uncond_fraction=uncond,
                  shard_size=cfg.shard_size, fingerprint=teacher_fingerprint(self.teacher),
                  event_shape=tuple(getattr(self.teacher, "event_shape", None) or self.student.net.event_shape),
                  progress=bool(context.get("progress", True)) and int(context.get("rank", 0)) == 0)
        if folder is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                self.pairs = generate_pairs(self.teacher, tmp, cfg.n_pairs, self.solver, **kw)
            return
        import fewstep.training.distributed as D

        if int(context.get("rank", 0)) == 0:
            self.pairs = ensure_pairs(self.teacher, folder, cfg.n_pairs, self.solver,
                                      allow_stale=cfg.allow_stale_pairs, **kw)
        D.barrier()
        if self.pairs is None:
            self.pairs = ensure_pairs(self.teacher, folder, cfg.n_pairs, self.solver,
                                      allow_stale=cfg.allow_stale_pairs, **kw)

    def take_pairs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pairs indexed by ``batch.u[:, 2]``, on the batch's device and dtype."""
        if self.pairs is None:
            self.prepare({})
        assert self.pairs is not None
        x1, x0, c = self.pairs.take(batch.u[:, U_SELECT])
        dev, dt = batch.x1.device, batch.x1.dtype
        return x1.to(dev, dt), x0.to(dev, dt), (c.to(dev) if c is not None else None)

    def ma_term(self, x_start: Tensor, t_start: Tensor | float, t_end: Tensor | float, cond: Tensor | None,
                step: int) -> tuple[Tensor | None, dict[str, float]]:
        """lambda * L_MA of :func:`ma_term` with this method's student, teacher(s) and config."""
        return ma_term(self.student, self.teacher, self.config, x_start, t_start, t_end, cond, step,
                       score_teacher=self.score_teacher)
