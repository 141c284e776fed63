r"""Discrete-time consistency models: consistency distillation (``cd``) and consistency training (``ct``).

The student is a consistency function :math:`f_\theta(x,t) = f_{t\to 0}(x) = x - t\,F_\theta(x,t,0)`
(``consistency`` parameterization, so :math:`f_{0\to0}=\mathrm{id}` exactly). On a grid
:math:`0 = t_0 < t_1 < \dots < t_N = 1` with :math:`N = N(k)` intervals at training step k, draw i ∈ {1..N},
:math:`t = t_i`, :math:`t' = t_{i-1}`, :math:`x_t = (1-t)x_0 + t x_1` and minimise

.. math::
    L(\theta) = E\big[\,w(t,t')\; d\big(f_\theta(x_t, t),\ \mathrm{sg}\,f_{\theta^-}(x_{t'}, t')\big)\big],

* ``cd``: :math:`x_{t'}` is one teacher ODE step from :math:`x_t` (Euler :math:`x_t - (t-t')v(x_t,t)` or Heun);
* ``ct``: :math:`x_{t'} = (1-t')x_0 + t' x_1` with the same :math:`(x_0, x_1)` (the conditional velocity
  :math:`x_1 - x_0` replaces the teacher; the loss vanishes at the exact flow map only as :math:`\Delta t\to0`),
  or, with ``velocity="batch"``, :math:`x_{t'} = x_t - (t-t')\hat v(x_t,t)` with the batch estimate
  :func:`batch_velocity` of the marginal velocity (still no teacher: the batch's data are the reference).

Distances: :math:`d = \|a-b\|^2` (``l2``) or pseudo-Huber :math:`\sqrt{\|a-b\|^2 + c^2} - c` (``pseudo_huber``).
Weights: :math:`w = 1` (``uniform``) or :math:`w = 1/(t - t')` (``inv_dt``, iCT). The target network
:math:`\theta^- \leftarrow \mu\theta^- + (1-\mu)\theta` after every update (μ = ``target_ema``; μ = 0 is iCT's
:math:`\theta^- = \mathrm{sg}(\theta)`). N(k) is fixed or iCT's curriculum
:math:`N(k) = \min(n_{min} 2^{\lfloor k/K'\rfloor}, n_{max})`,
:math:`K' = \lfloor K/(\log_2(n_{max}/n_{min})+1)\rfloor`, spread over K = ``curriculum_fraction`` × ``train.steps``
(the run's length, which the trainer passes to :meth:`Method.prepare`; default the whole run, so N reaches
:math:`n_{max}` before the end of any run of at least :math:`\log_2(n_{max}/n_{min})+1` steps) or over a fixed
``curriculum_steps`` K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fewstep.core.ema import ema_update_
from fewstep.core.flowmap import FlowMap
from fewstep.core.paths import LinearPath
from fewstep.core.utils import bcast
from fewstep.methods._shared.batch_velocity import batch_velocity
from fewstep.methods.base import U_LABEL_DROP, U_T, Batch, Method, MethodConfig, drop_labels
from fewstep.methods.registry import register
from fewstep.sampling.samplers import time_grid
from fewstep.sampling.spec import CONSISTENCY

__all__ = ["ConsistencyConfig", "ConsistencyDistillation", "ConsistencyTraining", "pseudo_huber",
           "discretization_steps", "curriculum_length", "consistency_grid"]

DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inv_dt")
VELOCITIES = ("conditional", "batch")


@dataclass
class ConsistencyConfig(MethodConfig):
    """Hyper-parameters of discrete consistency models.

    Attributes:
        distance: ``l2`` or ``pseudo_huber``.
        huber_c: The c of the pseudo-Huber distance (absolute, in data units).
        weighting: ``uniform`` or ``inv_dt`` (w = 1/(t - t')).
        target_ema: EMA decay μ of the target network θ⁻ (0: θ⁻ = sg(θ)).
        n_schedule: ``fixed`` (N = n_steps) or ``ict`` (doubling curriculum from n_min to n_max).
        n_steps: Number of intervals N for the fixed schedule.
        n_min: First N of the curriculum.
        n_max: Last N of the curriculum.
        curriculum_fraction: Fraction of the run's ``train.steps`` the curriculum is spread over (K = fraction ×
            steps); None = 1.0 (the whole run) unless ``curriculum_steps`` is set.
        curriculum_steps: A fixed number of training steps K for the curriculum instead (it does not follow
            ``train.steps``); set at most one of the two.
        grid: ``uniform`` in t or ``edm`` (rho-spacing of the noise-to-signal ratio t/(1-t)).
        rho: EDM exponent.
        grid_jitter: Draw a continuous grid index (every t trained) instead of the N grid points.
        solver: Teacher step of ``cd``: ``euler`` or ``heun`` (ignored by ``ct``).
        velocity: Partner velocity of ``ct``: ``conditional`` (x1 - x0 of the row) or ``batch``
            (:func:`batch_velocity` over the batch's data; ignored by ``cd``).
        guidance: Teacher guidance weight (``cd``, class-conditional teachers).
        cond_drop: ``cd`` only: probability of replacing a class label by the null label -1 (student, target and
            teacher all see -1, the teacher's unconditional velocity), so the unconditional model is trained too.
    """

    distance: str = "pseudo_huber"
    huber_c: float = 0.03
    weighting: str = "uniform"
    target_ema: float = 0.95
    n_schedule: str = "fixed"
    n_steps: int = 16
    n_min: int = 10
    n_max: int = 640
    curriculum_fraction: float | None = None
    curriculum_steps: int | None = None
    grid: str = "uniform"
    rho: float = 7.0
    grid_jitter: bool = True
    solver: str = "heun"
    velocity: str = "conditional"
    guidance: float = 1.0
    cond_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; expected one of {DISTANCES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        if self.velocity not in VELOCITIES:
            raise ValueError(f"unknown velocity {self.velocity!r}; expected one of {VELOCITIES}")
        if self.n_schedule not in ("fixed", "ict"):
            raise ValueError(f"unknown n_schedule {self.n_schedule!r}; expected 'fixed' or 'ict'")
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"unknown solver {self.solver!r}; expected 'euler' or 'heun'")
        if self.grid not in ("uniform", "edm"):
            raise ValueError(f"unknown grid {self.grid!r}; expected 'uniform' or 'edm'")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1); got {self.target_ema}")
        if self.n_steps < 1 or self.n_min < 1 or self.n_max < self.n_min:
            raise ValueError(f"need n_steps >= 1 and 1 <= n_min <= n_max; got {self.n_steps}, {self.n_min}, "
                             f"{self.n_max}")
        if self.curriculum_fraction is not None and self.curriculum_steps is not None:
            raise ValueError("set curriculum_fraction or curriculum_steps, not both")
        f = self.curriculum_fraction
        if f is not None and not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f <= 1.0):
            raise ValueError(f"curriculum_fraction must lie in (0, 1]; got {f!r}")
        if self.curriculum_steps is not None and self.curriculum_steps < 1:
            raise ValueError(f"curriculum_steps must be >= 1; got {self.curriculum_steps}")
        if self.huber_c <= 0:
            raise ValueError(f"huber_c must be positive; got {self.huber_c}")
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop must lie in [0, 1]; got {self.cond_drop}")


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    r"""Per-sample pseudo-Huber distance :math:`\sqrt{\|a-b\|^2 + c^2} - c`, shape (batch,)."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def curriculum_length(cfg: ConsistencyConfig, train_steps: int | None) -> int:
    """Training steps K the iCT curriculum is spread over: ``curriculum_steps``, else fraction × ``train_steps``.

    Args:
        cfg: The method config.
        train_steps: The run's ``train.steps`` (None when unknown, e.g. a loss called outside the trainer).

    Returns:
        K >= 1.

    Raises:
        ValueError: K follows ``train.steps`` but ``train_steps`` is None.
    """
    if cfg.curriculum_steps is not None:
        return cfg.curriculum_steps
    if train_steps is None:
        raise ValueError("the iCT curriculum spans curriculum_fraction x train.steps, but the run length is unknown: "
                         "train through the Trainer (it calls method.prepare({'steps': ...})) or set curriculum_steps")
    frac = 1.0 if cfg.curriculum_fraction is None else cfg.curriculum_fraction
    return max(1, round(frac * train_steps))


def discretization_steps(step: int, cfg: ConsistencyConfig, train_steps: int | None = None) -> int:
    r"""Number of intervals N(k): fixed, or iCT's :math:`\min(n_{min}2^{\lfloor k/K'\rfloor}, n_{max})`.

    Args:
        step: Training step k (0-based).
        cfg: The method config.
        train_steps: The run's ``train.steps`` (:func:`curriculum_length`; unused by the fixed schedule).

    Returns:
        N(k).
    """
    if cfg.n_schedule == "fixed":
        return cfg.n_steps
    k_prime = max(1, math.floor(curriculum_length(cfg, train_steps) / (math.log2(cfg.n_max / cfg.n_min) + 1)))
    return int(min(cfg.n_min * 2 ** (step // k_prime), cfg.n_max))


def consistency_grid(n: int, kind: str = "uniform", rho: float = 7.0) -> Tensor:
    """Increasing grid 0 = t_0 < ... < t_n = 1 (float64) of the discretisation."""
    return time_grid(n, 1.0, 0.0, kind=kind, rho=rho).flip(0)


class _ConsistencyBase(Method):
    """Shared machinery: the EMA target network, the grid, the distance and the loss."""

    config_class = ConsistencyConfig
    parameterization = "consistency"
    sampler = CONSISTENCY  # multi-step: jump to data, re-noise with fresh noise (gamma = 1)
    needs_data = True

    def __init__(self, student: FlowMap, teacher: torch.nn.Module | None = None,
                 config: ConsistencyConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        self.require_parameterization()
        self.target = self.frozen_copy()
        self.train_steps: int | None = None  # the run's train.steps, set by prepare (the iCT curriculum follows it)

    def prepare(self, context: dict[str, Any]) -> None:
        """Remember the run's ``train.steps`` (``context['steps']``), the length the iCT curriculum follows."""
        super().prepare(context)
        steps = context.get("steps")
        self.train_steps = None if steps is None else int(steps)

    def partner(self, x_t: Tensor, t: Tensor, t_prev: Tensor, batch: Batch) -> Tensor:
        """The point x_{t'} paired with x_t (teacher step for cd, same (x0, x1) for ct)."""
        raise NotImplementedError

    def labels(self, batch: Batch) -> Batch:
        """The batch with the class labels every network sees (unchanged here; ``cd`` drops some)."""
        return batch

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample distance d(a, b), shape (batch,)."""
        if self.config.distance == "l2":
            return (a - b).flatten(1).pow(2).sum(1)
        return pseudo_huber(a, b, self.config.huber_c)

    def times(self, u: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Adjacent grid times (t_i, t_{i-1}) with i uniform on {1..N}; with ``grid_jitter`` a continuous index.

        Jitter: c ~ U(0, N), t = G(c), t' = G(max(c - 1, 0)) with G the piecewise-linear interpolation of the
        grid, so every t in (0, 1] is trained (a fixed grid only ever shows the network N distinct times,
        which leaves multi-step sampling at off-grid times to interpolation).
        """
        n = discretization_steps(step, self.config, self.train_steps)
        g = consistency_grid(n, self.config.grid, self.config.rho).to(u.device)
        if not self.config.grid_jitter:
            i = (u * n).long().clamp(0, n - 1) + 1
            return g[i].to(u.dtype), g[i - 1].to(u.dtype)
        c = u.double() * n

        def interp(x: Tensor) -> Tensor:
            i = x.floor().long().clamp(0, n - 1)
            return g[i] + (x - i) * (g[i + 1] - g[i])

        return interp(c).to(u.dtype), interp((c - 1).clamp(min=0.0)).to(u.dtype)

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.x0 is None:
            raise ValueError(f"{self.name} needs data batches (x0) to form x_t = (1-t) x0 + t x1")
        batch = self.labels(batch)
        t, t_prev = self.times(batch.u[:, U_T], step)
        x_t = LinearPath().interpolate(batch.x0, batch.x1, t)
        with torch.no_grad():
            x_prev = self.partner(x_t, t, t_prev, batch)
            target = self.target(x_prev, t_prev, torch.zeros_like(t), batch.cond)
        pred = self.student(x_t, t, torch.zeros_like(t), batch.cond)
        d = self.distance(pred, target)
        w = 1.0 / (t - t_prev) if self.config.weighting == "inv_dt" else torch.ones_like(t)
        loss = (w * d).mean()
        return loss, {"loss": float(loss.detach()), "distance": float(d.detach().mean()),
                      "N": float(discretization_steps(step, self.config, self.train_steps))}

    def after_update(self, name: str, step: int) -> None:
        if name == "student":
            ema_update_(self.target, self.student, self.config.target_ema)


@register
class ConsistencyDistillation(_ConsistencyBase):
    """Consistency distillation: x_{t'} is one Euler/Heun step of the frozen teacher from x_t."""

    name = "cd"
    description = "Consistency distillation (discrete CM): f(x_t,t) vs EMA f(teacher step to t', t')."
    needs_teacher = True

    def labels(self, batch: Batch) -> Batch:
        """Labels with a fraction ``cond_drop`` replaced by -1 (column ``U_LABEL_DROP``), as the flow-map methods."""
        return replace(batch, cond=drop_labels(batch.cond, batch.u[:, U_LABEL_DROP], self.config.cond_drop))

    def partner(self, x_t: Tensor, t: Tensor, t_prev: Tensor, batch: Batch) -> Tensor:
        r"""Euler :math:`x_t - h v(x_t,t)` or Heun :math:`x_t - \tfrac h2[v(x_t,t) + v(\tilde x, t')]`, h = t - t'."""
        g = self.config.guidance
        h = bcast(t - t_prev, x_t)
        v = self.velocity_target(x_t, t, batch.cond, g)
        x_e = x_t - h * v
        if self.config.solver == "euler":
            return x_e
        return x_t - 0.5 * h * (v + self.velocity_target(x_e, t_prev, batch.cond, g))


@register
class ConsistencyTraining(_ConsistencyBase):
    """Consistency training: x_{t'} = (1-t') x0 + t' x1 with the same (x0, x1), or the batch velocity; no teacher."""

    name = "ct"
    description = "Consistency training (discrete CM from data): same (x0, x1) at t and t'."
    needs_teacher = False

    def __init__(self, student: FlowMap, teacher: torch.nn.Module | None = None,
                 config: ConsistencyConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        if self.config.cond_drop:
            raise ValueError(f"cond_drop is cd-only (ct would ignore it); got {self.config.cond_drop}")

    def partner(self, x_t: Tensor, t: Tensor, t_prev: Tensor, batch: Batch) -> Tensor:
        """The same noise/data pair at the earlier time t', or one Euler step of :func:`batch_velocity`."""
        assert batch.x0 is not None
        if self.config.velocity == "batch":
            return x_t - bcast(t - t_prev, x_t) * batch_velocity(x_t, t, batch.x0, batch.cond)
        return LinearPath().interpolate(batch.x0, batch.x1, t_prev)
