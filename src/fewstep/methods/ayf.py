r"""Align Your Flow (Sabour, Fidler, Kreis 2025): Eulerian (EMD) and Lagrangian (LMD) map distillation.

Student :math:`f_{t\to s}(x) = x - (t-s)F_\theta(x,t,s)` (``average_velocity``), trained for s <= t on
:math:`x_t=(1-t)x_0+t x_1`. Both losses are written as an MSE to a stop-gradient target whose gradient is
AYF's :math:`w\,\mathrm{sign}\cdot f_\theta^\top(\cdot)`, with the tangent normalised as in sCM and a tangent
warm-up :math:`r: 0 \to r_{max}` over ``warmup_steps`` multiplying the JVP term.

**EMD** (Eulerian; teacher velocity or x1 - x0). The exact map satisfies :math:`\tfrac{d}{dt}f_{t\to s}(x_t) = 0`
along the ODE, with :math:`\tfrac{d}{dt}f = (v - F) - (t-s)\tfrac{dF}{dt}`:

.. math::
    g_E = (v - F^-) - r\,(t-s)\,\tfrac{dF^-}{dt},\quad (F^-, \tfrac{dF^-}{dt}) = \mathrm{jvp}(F, (x_t,t,s), (v,1,0)),
    \quad L_{EMD} = E\,\big\|F_\theta - \mathrm{sg}\big(F^- + g_E/(\|g_E\| + c)\big)\big\|^2 .

Without normalisation and with r = 1 the target is MeanFlow's :math:`v - (t-s)dF/dt`; at s = t it is
flow matching; at s = 0 it is the continuous CM.

**LMD** (Lagrangian; needs the teacher :math:`v_\phi`). The exact map satisfies
:math:`\partial_s f_{t\to s}(x) = v_\phi(f_{t\to s}(x), s)` with :math:`\partial_s f = F + (s-t)\partial_s F`:

.. math::
    g_L = F^- - r\,(t-s)\,\partial_s F^- - v_\phi(f^-_{t\to s}(x_t), s),\quad
    (F^-, \partial_s F^-) = \mathrm{jvp}(F, (x_t,t,s), (0,0,1)),
    \quad L_{LMD} = E\,\big\|F_\theta - \mathrm{sg}\big(F^- - g_L/(\|g_L\| + c)\big)\big\|^2 .

Without normalisation and with r = 1 the target is :math:`v_\phi(x_s, s) + (t-s)\partial_s F`, the s-derivative
of :math:`(t-s)F = \int_s^t v`. Optionally the per-sample error e is replaced by MeanFlow's adaptive
:math:`e/\mathrm{sg}((e+\epsilon)^p)` (``norm_p > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.utils import bcast
from fewstep.methods._shared.flowmap_base import AverageVelocityConfig, AverageVelocityMethod
from fewstep.methods._shared.flowmap_helpers import adaptive_weight, sq_norm, tangent_normalize, warmup_ratio
from fewstep.methods.base import Batch
from fewstep.methods.registry import register

__all__ = ["AYFConfig", "AYFEulerian", "AYFLagrangian"]


@dataclass
class AYFConfig(AverageVelocityConfig):
    """AYF hyper-parameters shared by EMD and LMD (plus those of :class:`AverageVelocityConfig`).

    Attributes:
        equal_fraction: Fraction of rows with s = t (flow-matching rows).
        tangent_norm_c: Constant c of the tangent normalisation g/(|g|+c); <= 0 disables it.
        warmup_steps: Steps over which the warm-up r rises linearly from 0 to r_max (0: r = r_max).
        r_max: Final warm-up factor (AYF reports 0.99 for images; 1 gives the exact objective).
        norm_p: Power of the optional adaptive weight (0 = plain squared error).
    """

    equal_fraction: float = 0.25
    tangent_norm_c: float = 0.1
    warmup_steps: int = 1000
    r_max: float = 1.0
    norm_p: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if not 0.0 <= self.r_max <= 1.0:
            raise ValueError(f"r_max must lie in [0, 1]; got {self.r_max}")


class _AYFBase(AverageVelocityMethod):
    """Shared loss skeleton: sample (t, s), build the tangent g, regress F onto sg(F^- + sign * g_normalised)."""

    config_class = AYFConfig
    _sign: float = 1.0

    def tangent(self, x_t: Tensor, t: Tensor, s: Tensor, v: Tensor, cond: Tensor | None,
                r: float) -> tuple[Tensor, Tensor]:
        """Return the detached (F^-, g) of this variant (see module docstring)."""
        raise NotImplementedError

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """AYF loss on one batch (see module docstring)."""
        cfg = self.config
        t, s, x_t, dx, cond = self.draw(batch)
        v = self.velocity(x_t, t, dx, cond)
        r = warmup_ratio(step, cfg.warmup_steps, cfg.r_max)
        F_m, g = self.tangent(x_t, t, s, v, cond, r)
        target = F_m + self._sign * tangent_normalize(g, cfg.tangent_norm_c)
        pred = self.student.F(x_t, t, s, cond)
        err = sq_norm(pred - target)
        loss = adaptive_weight(err, cfg.norm_p, cfg.norm_eps).mean()
        return loss, {"loss": float(loss.detach()), "mse": float(err.detach().mean()),
                      "tangent_norm": float(sq_norm(g).sqrt().mean()), "warmup_r": r}


@register
class AYFEulerian(_AYFBase):
    """AYF-EMD: Eulerian map distillation, d/dt f_{t->s}(x_t) = 0 (teacher or data velocity)."""

    name = "ayf_emd"
    description = "AYF-EMD: Eulerian flow-map distillation (JVP in t), tangent normalisation and warm-up."
    _sign = 1.0

    def tangent(self, x_t: Tensor, t: Tensor, s: Tensor, v: Tensor, cond: Tensor | None,
                r: float) -> tuple[Tensor, Tensor]:
        r""":math:`g_E = (v - F^-) - r(t-s)\,dF^-/dt` with the JVP tangent (v, 1, 0)."""
        F_m, dF = self.student_jvp(x_t, t, s, (v, torch.ones_like(t), torch.zeros_like(s)), cond)
        return F_m, (v - F_m) - r * bcast(t - s, v) * dF


@register
class AYFLagrangian(_AYFBase):
    """AYF-LMD: Lagrangian map distillation, d/ds f_{t->s}(x) = v_teacher(f_{t->s}(x), s)."""

    name = "ayf_lmd"
    description = "AYF-LMD: Lagrangian flow-map distillation (JVP in s + teacher at the jump end)."
    needs_teacher = True
    _sign = -1.0

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, config: AYFConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        if not self.distilling:
            raise ValueError("ayf_lmd distils a teacher: it needs a teacher and use_teacher=True")

    def tangent(self, x_t: Tensor, t: Tensor, s: Tensor, v: Tensor, cond: Tensor | None,
                r: float) -> tuple[Tensor, Tensor]:
        r""":math:`g_L = F^- - r(t-s)\partial_s F^- - v_\phi(x_t - (t-s)F^-, s)` with the JVP tangent (0, 0, 1)."""
        zero = torch.zeros_like(t)
        F_m, dF_ds = self.student_jvp(x_t, t, s, (torch.zeros_like(x_t), zero, torch.ones_like(s)), cond)
        x_s = x_t - bcast(t - s, x_t) * F_m
        v_s = self.velocity(x_s, s, torch.zeros_like(x_s), cond)
        return F_m, F_m - r * bcast(t - s, v) * dF_ds - v_s
