r"""SplitMeanFlow: the interval-splitting identity of the average velocity, no JVP.

For :math:`s < r < t` the average velocity is additive over intervals,
:math:`(t-s)F(x_t,t,s) = (t-r)F(x_t,t,r) + (r-s)F(x_r,r,s)` with :math:`x_r = x_t - (t-r)F(x_t,t,r)`
(Guo et al. 2025). With :math:`r = s + \lambda(t-s)`, :math:`\lambda \sim U(0,1)`, the loss on
:math:`x_t=(1-t)x_0+t x_1` is

.. math::
    F_{tgt} = \mathrm{sg}\Big[\frac{(t-r)F_\theta(x_t,t,r) + (r-s)F_\theta(x_r,r,s)}{t-s}\Big],\qquad
    L = E\big[w(\Delta)\big],\ \Delta = \|F_\theta(x_t,t,s) - F_{tgt}\|^2,

on the rows with s < t, and the flow-matching boundary :math:`F_{tgt} = v` (teacher velocity or
:math:`x_1-x_0`) at s = t on a fraction ``equal_fraction`` of the batch; w is MeanFlow's adaptive weight
:math:`\Delta/\mathrm{sg}((\Delta+c)^p)` (default p = 0, plain L2).
The boundary rows pin the instantaneous velocity; the split rows propagate it to longer jumps; a fraction
``corner_fraction`` of the split rows sits exactly at the 1-step jump (t, s) = (1, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.timesteps import sample_time
from fewstep.core.utils import bcast
from fewstep.methods._shared.flowmap_base import AverageVelocityConfig, AverageVelocityMethod
from fewstep.methods._shared.flowmap_helpers import adaptive_weight, sq_norm
from fewstep.methods.base import U_AUX, Batch
from fewstep.methods.registry import register

__all__ = ["SplitMeanFlowConfig", "SplitMeanFlow"]


@dataclass
class SplitMeanFlowConfig(AverageVelocityConfig):
    """SplitMeanFlow hyper-parameters (plus those of :class:`AverageVelocityConfig`).

    Attributes:
        corner_fraction: Fraction of rows at (t, s) = (1, 0); 0.1 (on ring8 it changed 1-NFE by less than the
            seed noise and lowered the 2- and 4-NFE MMD², see docs/results/flowmap_a.md).
        norm_p: Power of the adaptive weight (0 = plain L2, the default: with an exact teacher velocity the
            split rows reach tiny errors early and p = 1 would up-weight them ~1/c and starve the boundary rows).
        split_sampler: How lambda = (r-s)/(t-s) is drawn: ``uniform`` or ``logit_normal`` (mean 0, std 1).
    """

    corner_fraction: float = 0.1
    norm_p: float = 0.0
    split_sampler: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_sampler not in ("uniform", "logit_normal"):
            raise ValueError(f"split_sampler must be 'uniform' or 'logit_normal'; got {self.split_sampler!r}")


@register
class SplitMeanFlow(AverageVelocityMethod):
    """SplitMeanFlow: (t-s)F(t,s) = (t-r)F(t,r) + (r-s)F(r,s) self-consistency plus the FM boundary."""

    name = "splitmeanflow"
    description = "SplitMeanFlow: interval-splitting consistency of the average velocity (no JVP) + FM boundary."
    config_class = SplitMeanFlowConfig

    def split_target(self, x_t: Tensor, t: Tensor, s: Tensor, r: Tensor, cond: Tensor | None) -> Tensor:
        r"""The detached two-jump target :math:`[(t-r)F(x_t,t,r) + (r-s)F(x_r,r,s)]/(t-s)` (rows with t > s)."""
        with torch.no_grad():
            F_tr = self.student.F(x_t, t, r, cond)
            x_r = x_t - bcast(t - r, x_t) * F_tr
            F_rs = self.student.F(x_r, r, s, cond)
            gap = (t - s).clamp_min(torch.finfo(x_t.dtype).tiny)
            return (bcast(t - r, x_t) * F_tr + bcast(r - s, x_t) * F_rs) / bcast(gap, x_t)

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """SplitMeanFlow loss on one batch (see module docstring)."""
        cfg = self.config
        t, s, x_t, dx, cond = self.draw(batch)
        lam = sample_time(batch.u[:, U_AUX], cfg.split_sampler)
        r = s + lam * (t - s)
        boundary = t == s
        v = self.velocity(x_t, t, dx, cond)
        target = torch.where(bcast(boundary, v), v, self.split_target(x_t, t, s, r, cond))
        pred = self.student.F(x_t, t, s, cond)
        delta = sq_norm(pred - target)
        loss = adaptive_weight(delta, cfg.norm_p, cfg.norm_eps).mean()
        logs = {"loss": float(loss.detach()), "mse": float(delta.detach().mean())}
        d = delta.detach()
        if bool(boundary.any()):
            logs["mse_boundary"] = float(d[boundary].mean())
        if bool((~boundary).any()):
            logs["mse_split"] = float(d[~boundary].mean())
        return loss, logs
