r"""Shortcut models (Frans et al., ICLR 2025) as a step-size-conditioned flow map.

The student is our ``average_velocity`` flow map :math:`f_{t\to s}(x) = x - (t-s)F_\theta(x,t,s)`; the step size
of the paper is :math:`d = t - s` (the backbone sees t and h = t - s). A batch is split into

* **flow-matching rows** at :math:`d = 0` (s = t; or at :math:`d_{min}` with ``fm_at_dmin``), loss
  :math:`\|F_\theta(x_t,t,t) - v\|^2` with v the teacher velocity :math:`v_\phi(x_t,t)` (``target="teacher"``,
  distillation) or :math:`x_1 - x_0` (``target="data"``, training from scratch);
* **self-consistency rows** (fraction ``bootstrap_fraction``; paper 1/8) on the dyadic grid: the trained step is
  :math:`2d = 2^{-k}`, k uniform on {0..levels-1}, t uniform on the grid {2d, 4d, .., 1}, and with the EMA
  target network θ⁻

  .. math::
      x' = x_t - d\,F^-(x_t,t,t-d),\quad
      F_{tgt} = \mathrm{clip}\big(\tfrac12[F^-(x_t,t,t-d) + F^-(x',t-d,t-2d)]\big),\quad
      L = \|F_\theta(x_t,t,t-2d) - \mathrm{sg}(F_{tgt})\|^2 .

  At the finest level (:math:`d = d_{min} = 2^{-levels}`) the half steps query :math:`F^-(\cdot,\tau,\tau)` (the
  instantaneous velocity) unless ``fm_at_dmin`` trains F at :math:`d_{min}` directly, as the paper's code does.

:math:`x_t = (1-t)x_0 + t x_1`. The total loss is the mean over all rows of both squared errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.ema import ema_update_
from fewstep.core.flowmap import FlowMap
from fewstep.core.paths import LinearPath
from fewstep.core.utils import bcast
from fewstep.methods.base import U_SELECT, U_T, Batch, Method, MethodConfig
from fewstep.methods.registry import register

__all__ = ["ShortcutConfig", "Shortcut", "shortcut_target"]


@dataclass
class ShortcutConfig(MethodConfig):
    """Hyper-parameters of shortcut models.

    Attributes:
        bootstrap_fraction: Fraction of the batch used for self-consistency rows (paper: 1/8).
        levels: Number of dyadic step sizes; trained steps 2d ∈ {1, 1/2, .., 2^{1-levels}}.
        target: FM target, ``teacher`` (distillation) or ``data`` (x1 - x0).
        target_ema: EMA decay of the bootstrap target network θ⁻ (0: θ⁻ = sg(θ)).
        target_clip: Clip of the bootstrap targets to [-c, c] (0 disables).
        fm_at_dmin: Train the FM rows at d = d_min instead of d = 0 (paper's code).
        guidance: Teacher guidance weight.
    """

    bootstrap_fraction: float = 0.25
    levels: int = 7
    target: str = "teacher"
    target_ema: float = 0.99
    target_clip: float = 10.0
    fm_at_dmin: bool = False
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.bootstrap_fraction <= 1.0:
            raise ValueError(f"bootstrap_fraction must lie in [0, 1]; got {self.bootstrap_fraction}")
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1; got {self.levels}")
        if self.target not in ("teacher", "data"):
            raise ValueError(f"unknown target {self.target!r}; expected 'teacher' or 'data'")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1); got {self.target_ema}")
        if self.target_clip < 0:
            raise ValueError(f"target_clip must be >= 0; got {self.target_clip}")


def shortcut_target(net: FlowMap, x: Tensor, t: Tensor, d: Tensor, finest: Tensor | None = None,
                    cond: Tensor | None = None, clip: float = 0.0) -> Tensor:
    r"""Two-half-step target :math:`\tfrac12[F(x,t,t-d) + F(x', t-d, t-2d)]`, :math:`x' = x - d F(x,t,t-d)`.

    Args:
        net: The (target) flow map; F is read as ``net.F``.
        x: Points x_t, shape (B, ...).
        t: Times, shape (B,), with t - 2d >= 0.
        d: Half step sizes, shape (B,).
        finest: Optional bool mask (B,): rows whose half steps use the instantaneous velocity F(., tau, tau).
        cond: Optional labels.
        clip: Clip the target to [-clip, clip] (0: no clipping).

    Returns:
        The target average velocity, shaped like ``x``.
    """
    if bool((t - 2 * d < -1e-6).any()):
        raise ValueError("shortcut_target needs t - 2d >= 0 for every row")
    mid = (t - d).clamp(min=0.0)
    end = (t - 2 * d).clamp(min=0.0)
    s1, s2 = mid, end
    if finest is not None:
        s1, s2 = torch.where(finest, t, mid), torch.where(finest, mid, end)
    f1 = net.F(x, t, s1, cond)
    x_mid = x - bcast(d, x) * f1
    f2 = net.F(x_mid, mid, s2, cond)
    out = 0.5 * (f1 + f2)
    return out.clamp(-clip, clip) if clip > 0 else out


@register
class Shortcut(Method):
    """Shortcut model: FM rows plus dyadic self-consistency rows against an EMA target."""

    name = "shortcut"
    description = "Shortcut models: FM at d=0 plus self-consistency F(t,2d) = mean of two EMA half steps."
    config_class = ShortcutConfig
    parameterization = "average_velocity"
    needs_teacher = False
    needs_data = True

    def __init__(self, student: FlowMap, teacher: torch.nn.Module | None = None,
                 config: ShortcutConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        if self.config.target == "teacher" and teacher is None:
            raise ValueError("shortcut with target='teacher' needs a teacher; use target='data' to train from data")
        if getattr(student, "parameterization", "average_velocity") != "average_velocity":
            raise ValueError(f"shortcut trains an 'average_velocity' student; got {student.parameterization!r}")
        self.target_net = self.frozen_copy()

    @classmethod
    def uses_teacher(cls, config: ShortcutConfig) -> bool:
        """The FM rows use the teacher's velocity when ``target="teacher"``."""
        return config.target == "teacher"

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.x0 is None:
            raise ValueError("shortcut needs data batches (x0) to form x_t = (1-t) x0 + t x1")
        cfg, x0, x1, u, cond = self.config, batch.x0, batch.x1, batch.u, batch.cond
        n_b = int(round(cfg.bootstrap_fraction * batch.size))
        d_min = 2.0 ** (-cfg.levels)
        # --- self-consistency rows: level k, trained step 2d = 2^-k, t = j * 2d with j in {1..2^k}
        k = (u[:n_b, U_SELECT] * cfg.levels).long().clamp(max=cfg.levels - 1)
        two_d = torch.pow(2.0, -k.to(u.dtype))
        j = (u[:n_b, U_T] * torch.pow(2.0, k.to(u.dtype))).floor() + 1
        t_b = (j * two_d).clamp(max=1.0)
        # --- flow-matching rows: t uniform on [d_min, 1] (or (0, 1]), s = t or t - d_min
        lo = d_min if cfg.fm_at_dmin else 0.0
        t_f = lo + (1.0 - lo) * u[n_b:, U_T]
        t = torch.cat([t_b, t_f])
        x_t = LinearPath().interpolate(x0, x1, t)
        with torch.no_grad():
            v = (x1 - x0)[n_b:]
            if cfg.target == "teacher" and n_b < batch.size:
                v = self.velocity_target(x_t[n_b:], t_f, None if cond is None else cond[n_b:], cfg.guidance)
            tgt_b = x_t[:0]
            if n_b > 0:
                finest = None if cfg.fm_at_dmin else 0.5 * two_d <= d_min * 1.0001
                tgt_b = shortcut_target(self.target_net, x_t[:n_b], t_b, 0.5 * two_d, finest,
                                        None if cond is None else cond[:n_b], cfg.target_clip)
        s_f = t_f - d_min if cfg.fm_at_dmin else t_f
        s = torch.cat([t_b - two_d, s_f]).clamp(min=0.0)
        pred = self.student.F(x_t, t, s, cond)
        err = (pred - torch.cat([tgt_b, v])).flatten(1).pow(2).sum(1)
        loss = err.mean()
        logs = {"loss": float(loss.detach()), "fm": float(err[n_b:].detach().mean()) if n_b < batch.size else 0.0,
                "bootstrap": float(err[:n_b].detach().mean()) if n_b > 0 else 0.0}
        return loss, logs

    def after_update(self, name: str, step: int) -> None:
        if name == "student":
            ema_update_(self.target_net, self.student, self.config.target_ema)
