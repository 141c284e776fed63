r"""FACM: Flow-Anchored Consistency Model (Peng et al. 2025), converted to t = 1 noise.

One network, two branches. The consistency branch is the student :math:`f(x,t) = x - tF(x,t,0)`; the
flow-matching anchor is the same network asked for the instantaneous velocity on a second, glued time
interval. FACM's code does this with an expanded time input: in its data-time convention (1 = data) the FM
branch sees :math:`2 - t_c \in [1, 2]`, and in the opposite convention (ours, 0 = data) it sees
:math:`-t \in [-1, 0]`, so that both intervals meet at the data end. Two faithful realisations
(``anchor``):

* ``negative_time``: the FM branch is :math:`F(x, -t)` -- exactly FACM's mirrored time interval; works with
  any backbone that accepts t outside [0, 1] (our MLP embeds t sinusoidally) and ignores s.
* ``h0``: for a backbone that embeds (t, h = t - s) (``use_s=True``), the CM branch is :math:`F(x,t,s'=0)`
  (h = t) and the FM branch is :math:`F(x,t,s'=t)` (h = 0); the branches again meet at t = 0.
* ``auto`` (default): ``h0`` if the backbone sees s, else ``negative_time``.

In both realisations the two branches coincide at t = 0, where the consistency output F(x, 0, 0) and the
anchor must both equal v(x, 0), as on FACM's glued intervals.

Losses on :math:`x_t=(1-t)x_0+t x_1` with v the teacher velocity (or :math:`x_1 - x_0` from data):

.. math::
    (F^-, \tfrac{dF^-}{dt}) = \mathrm{jvp}(F(\cdot,\cdot,0), (x_t,t), (v,1)),\quad
    \bar v = v - t\,\tfrac{dF^-}{dt},\quad g = F^- - \bar v,\quad
    F_{tgt} = \mathrm{sg}\big(F^- - a(t)\,\mathrm{clip}(g, -1, 1)\big),\ a(t) = 1 - (1-t)^{p},

    L_{CM} = \sin(\tfrac{\pi t}{2})\, e/\mathrm{sg}((e + c)^{1/2}),\ e = \mathrm{mean}_d (F(x_t,t,0) - F_{tgt})^2,

    L_{FM} = \mathrm{mean}_d (F(x_t,t,t) - v)^2 + 1 - \cos(F(x_t,t,t), v),\qquad L = E[L_{CM}] + E[L_{FM}].

Conversion check against the code's data-time :math:`t_c = 1 - t`: its velocity and output flip sign
(:math:`x_0 - x_1`), :math:`d/dt_c = -d/dt`, so :math:`\bar v_c = v_c + (1 - t_c)\,dF_c/dt_c` becomes
:math:`\bar v = v - t\,dF/dt`; :math:`a = 1 - t_c^{p}` becomes :math:`1-(1-t)^p`; the weight
:math:`\cos(\pi t_c/2)` becomes :math:`\sin(\pi t/2)`; clip is odd, so the target keeps its form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fewstep.core.utils import bcast
from fewstep.methods._shared.flowmap_base import FlowMapTrainConfig, FlowMapTrainMethod
from fewstep.methods._shared.flowmap_helpers import consistency_time
from fewstep.methods.base import Batch
from fewstep.methods.registry import register
from fewstep.sampling.spec import CONSISTENCY

__all__ = ["FACMConfig", "FACM", "ANCHORS"]

ANCHORS: tuple[str, ...] = ("auto", "negative_time", "h0")


@dataclass
class FACMConfig(FlowMapTrainConfig):
    """FACM hyper-parameters (plus those of :class:`FlowMapTrainConfig`).

    Attributes:
        t_min: Smallest training time (> 0).
        logit_mean: Logit-normal location (FACM distillation: -0.8 in our convention).
        logit_std: Logit-normal scale (FACM: 1.6).
        alpha_p: Exponent p of the relaxation a(t) = 1 - (1-t)^p.
        clip: Clip of the tangent g (FACM: 1).
        norm_p: Power of the norm-L2 weight of the CM loss (FACM: 0.5).
        norm_eps: Constant of the norm-L2 weight (FACM: 1e-3).
        time_weight: Multiply the CM loss by sin(pi t / 2).
        fm_weight: Weight of the flow-matching anchor.
        cos_weight: Weight of the 1 - cosine term inside the anchor.
        anchor: How the FM branch is realised: ``auto``, ``negative_time`` or ``h0`` (module docstring).
        t_one_fraction: Fraction of rows trained at exactly t = t_max (the 1-step jump;
            :func:`fewstep.methods._shared.flowmap_helpers.consistency_time`).
    """

    t_min: float = 1e-3
    logit_mean: float = -0.8
    logit_std: float = 1.6
    alpha_p: float = 0.5
    clip: float = 1.0
    norm_p: float = 0.5
    norm_eps: float = 1e-3
    time_weight: bool = True
    fm_weight: float = 1.0
    cos_weight: float = 1.0
    anchor: str = "auto"
    t_one_fraction: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.t_one_fraction <= 1.0:
            raise ValueError(f"t_one_fraction must lie in [0, 1]; got {self.t_one_fraction}")
        if self.t_min <= 0.0:
            raise ValueError(f"FACM needs t_min > 0; got t_min={self.t_min}")
        if self.alpha_p <= 0 or self.clip <= 0:
            raise ValueError(f"alpha_p and clip must be positive; got {self.alpha_p}, {self.clip}")
        if self.fm_weight < 0 or self.cos_weight < 0 or self.norm_p < 0 or self.norm_eps <= 0:
            raise ValueError("fm_weight, cos_weight, norm_p must be >= 0 and norm_eps > 0")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}; got {self.anchor!r}")


@register
class FACM(FlowMapTrainMethod):
    """FACM: continuous consistency branch F(x,t,0) anchored by a flow-matching branch of the same network."""

    name = "facm"
    description = "FACM: consistency model F(x,t,0) + flow-matching anchor on a glued time interval, one network."
    config_class = FACMConfig
    parameterization = "consistency"
    sampler = CONSISTENCY  # multi-step: jump to data, re-noise with fresh noise (gamma = 1)

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, config: FACMConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        sees_s = getattr(self.student.net, "use_s", True) is not False
        mode = self.config.anchor
        if mode == "auto":
            mode = "h0" if sees_s else "negative_time"
        if mode == "h0" and not sees_s:
            raise ValueError("anchor='h0' needs a backbone that sees the second time (MLP(..., use_s=True)); "
                             "use anchor='negative_time' for a backbone without s")
        self.anchor_mode = mode

    def anchor(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The flow-matching branch: F(x, -t) (``negative_time``) or F(x, t, s'=t) (``h0``)."""
        if self.anchor_mode == "h0":
            return self.student.net(x, t, t, cond)
        return self.student.net(x, -t, -t, cond)

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """FACM loss on one batch (see module docstring)."""
        cfg = self.config
        t = consistency_time(batch.u, cfg, cfg.t_one_fraction)
        x_t, dx = self.noisy_input(batch, t)
        cond = self.drop_labels(batch)
        v = self.velocity(x_t, t, dx, cond)
        zero = torch.zeros_like(t)
        F_m, dF = self.student_jvp(x_t, t, zero, (v, torch.ones_like(t), zero), cond)
        g = F_m - (v - bcast(t, v) * dF)
        a = 1 - (1 - t).pow(cfg.alpha_p)
        target = F_m - bcast(a, g) * g.clamp(-cfg.clip, cfg.clip)
        pred = self.student.F(x_t, t, 0.0, cond)
        e = (pred - target).reshape(t.shape[0], -1).pow(2).mean(1)
        cm = e / (e.detach() + cfg.norm_eps).pow(cfg.norm_p)
        if cfg.time_weight:
            cm = cm * torch.sin(0.5 * math.pi * t)
        fm_pred = self.anchor(x_t, t, cond)
        fm_mse = (fm_pred - v).reshape(t.shape[0], -1).pow(2).mean(1)
        cos = nnf.cosine_similarity(fm_pred, v, dim=1).reshape(t.shape[0], -1).mean(1)
        fm = fm_mse + cfg.cos_weight * (1 - cos)
        loss = cm.mean() + cfg.fm_weight * fm.mean()
        return loss, {"loss": float(loss.detach()), "cm": float(cm.detach().mean()), "fm": float(fm.detach().mean()),
                      "cm_mse": float(e.detach().mean()), "fm_mse": float(fm_mse.detach().mean())}
