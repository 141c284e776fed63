r"""MeanFlow: train the average velocity with the MeanFlow identity (distilled from a teacher or from data).

The student is :math:`f_{t\to s}(x) = x - (t-s)F_\theta(x,t,s)` with F the average velocity
:math:`\frac{1}{t-s}\int_s^t v(x_\tau,\tau)d\tau`. Differentiating :math:`(t-s)F = \int_s^t v` in t gives the
MeanFlow identity :math:`v(x_t,t) = F + (t-s)\tfrac{d}{dt}F`, so the loss, on :math:`x_t=(1-t)x_0+t x_1`, is

.. math::
    F_{tgt} = \mathrm{sg}\big(v - (t-s)\,\tfrac{dF_\theta}{dt}\big),\qquad
    (F_\theta, \tfrac{dF_\theta}{dt}) = \mathrm{jvp}\big(F_\theta, (x_t, t, s), (v, 1, 0)\big),

    \Delta = \|F_\theta(x_t,t,s) - F_{tgt}\|^2,\qquad L = E\big[\Delta / \mathrm{sg}((\Delta + c)^p)\big],

with v the teacher velocity :math:`v_\phi(x_t,t)` (distillation) or :math:`x_1 - x_0` (training from data when
no teacher is given). A fraction of the rows has s = t (plain flow matching on F(x,t,t)), a fraction has s = 0
with t from the sampler (``zero_fraction``, jumps to data) and a fraction sits exactly at the 1-step jump
(t, s) = (1, 0) (``corner_fraction``). Optional training-time guidance from data
(MeanFlow §4): :math:`v_g = \omega(x_1-x_0) + (1-\omega-\kappa)F_\theta(x,t,t,\varnothing) + \kappa F_\theta(x,t,t,c)`
for t in [guidance_t_min, guidance_t_max]; with a teacher the teacher's CFG weight ``guidance`` is used
on that t-range instead.

The shared machinery (time sampling, adaptive weight, teacher-or-data velocity, the student's JVP) lives in
:mod:`fewstep.methods._shared.flowmap_base` and :mod:`fewstep.methods._shared.flowmap_helpers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.utils import bcast
from fewstep.methods._shared.flowmap_base import AverageVelocityConfig, AverageVelocityMethod
from fewstep.methods._shared.flowmap_helpers import adaptive_weight, sq_norm
from fewstep.methods.base import Batch
from fewstep.methods.registry import register

__all__ = ["MeanFlowConfig", "MeanFlow"]


@dataclass
class MeanFlowConfig(AverageVelocityConfig):
    """MeanFlow hyper-parameters (plus those of :class:`AverageVelocityConfig`).

    Attributes:
        norm_p: Power p of the adaptive weight. Default 1: with the default 32-frequency time embedding the JVP
            target diverged for smaller p. With the smooth raw-time student of configs/meanflow.yaml p = 0 (plain
            L2) measured best on ring8 (docs/results/flowmap_a.md), so that config sets it.
        omega: Training-time guidance weight on the data velocity (from-data mode, class-conditional).
        kappa: Weight of the model's own conditional velocity in the training-time guidance.
    """

    norm_p: float = 1.0
    omega: float = 1.0
    kappa: float = 0.0


@register
class MeanFlow(AverageVelocityMethod):
    """MeanFlow (Geng et al. 2025): average-velocity flow map via the MeanFlow identity and one JVP."""

    name = "meanflow"
    description = "MeanFlow: average velocity from the identity v = F + (t-s) dF/dt (JVP); teacher or data."
    config_class = MeanFlowConfig
    parameterization = "average_velocity"

    def guided_velocity(self, x_t: Tensor, t: Tensor, dx: Tensor, cond: Tensor | None) -> Tensor:
        r"""From data: :math:`\omega(x_1-x_0) + (1-\omega-\kappa)F(x,t,t,\varnothing) + \kappa F(x,t,t,c)`."""
        cfg = self.config
        if self.distilling or cond is None or (cfg.omega == 1.0 and cfg.kappa == 0.0):
            return self.velocity(x_t, t, dx, cond)
        with torch.no_grad():
            fn = self.student.net
            v_u = fn(x_t, t, t, torch.full_like(cond, -1))
            v_c = fn(x_t, t, t, cond)
        v_g = cfg.omega * dx + (1 - cfg.omega - cfg.kappa) * v_u + cfg.kappa * v_c
        use = self.in_guidance_range(t) & (cond >= 0)
        return torch.where(bcast(use, dx), v_g, dx)

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """MeanFlow loss on one batch (see module docstring)."""
        cfg = self.config
        t, s, x_t, dx, cond = self.draw(batch)
        v = self.guided_velocity(x_t, t, dx, cond)
        _, dF = self.student_jvp(x_t, t, s, (v, torch.ones_like(t), torch.zeros_like(s)), cond)
        jvp_term = bcast(t - s, v) * dF
        target = v - jvp_term
        pred = self.student.F(x_t, t, s, cond)
        delta = sq_norm(pred - target)
        loss = adaptive_weight(delta, cfg.norm_p, cfg.norm_eps).mean()
        return loss, {"loss": float(loss.detach()), "mse": float(delta.detach().mean()),
                      "tangent_norm": float(sq_norm(jvp_term).sqrt().mean())}
