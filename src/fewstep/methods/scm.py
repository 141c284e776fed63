r"""Continuous-time consistency models (sCM: sCD with a teacher, sCT from data) on the linear path.

The student is a consistency model :math:`f_\theta(x,t) = x - tF_\theta(x,t,0)` (``consistency``
parameterization). The continuous CM asks :math:`\tfrac{d}{dt}f(x_t,t) = 0` along the probability-flow ODE;
with :math:`\tfrac{d}{dt}f = v - F - t\tfrac{d}{dt}F = -(F - \bar v)`,
:math:`\bar v = v - r\,t\,\tfrac{dF^-}{dt}` (r = 1 after warm-up), the loss on :math:`x_t=(1-t)x_0+t x_1` is

.. math::
    (F^-, \tfrac{dF^-}{dt}) = \mathrm{jvp}(F_{\theta^-}, (x_t, t), (v, 1)),\quad g = F^- - \bar v,\quad
    F_{tgt} = \mathrm{sg}\Big(F^- - \frac{g}{\|g\| + c}\Big),\quad e = \|F_\theta(x_t,t,0) - F_{tgt}\|^2,

and :math:`L = E[e]`, :math:`E[e/\mathrm{sg}((e+\epsilon)^p)]` (``weighting="adaptive"``) or sCM's learned
weighting :math:`E[e^{w_\phi(t)} e / D - w_\phi(t)]` (``weighting="learned"``). The tangent warm-up r rises
linearly from 0 to 1 over ``warmup_steps`` (r = 0 is flow matching of F(x,t,0) on v). Without normalisation
and with r = 1 the target is :math:`v - t\,dF/dt`, i.e. MeanFlow with s = 0.

Conversion from TrigFlow (Lu & Song 2024; :math:`x_\tau = \cos\tau\,x_0 + \sin\tau\,z`,
:math:`f = \cos\tau\,x_\tau - \sin\tau\,\sigma_d F`, :math:`\tau \in [0, \pi/2]`, data at 0): our
:math:`x_t = x_\tau/(\cos\tau + \sin\tau)` with :math:`t = \tan\tau/(1 + \tan\tau)` is the same
probability-flow trajectory point rescaled, so the consistency function (the trajectory's end point) and
the condition :math:`df/dt = 0` are unchanged. sCM's target :math:`F^- - \cos\tau\,g` with the prior
weight :math:`1/(\sigma_d\tan\tau)` becomes :math:`F^- - g` in our parameterization with the prior weight
:math:`w(t) = 1/t` (both are :math:`\approx 1/t` near the data; the factor w·t = 1 replaces cos τ), the
warm-up factor r multiplies the JVP term :math:`t\,dF/dt` (TrigFlow's :math:`\sin\tau` term), and the
tangent is normalised as in sCM, :math:`g/(\|g\| + 0.1)` with the per-sample L2 norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.core.utils import bcast, count_dims
from fewstep.methods._shared.flowmap_base import FlowMapTrainConfig, FlowMapTrainMethod
from fewstep.methods._shared.flowmap_helpers import (
    adaptive_weight,
    consistency_time,
    sq_norm,
    tangent_normalize,
    warmup_ratio,
)
from fewstep.methods.base import Batch
from fewstep.methods.registry import register
from fewstep.networks.mlp import SinusoidalEmbedding
from fewstep.sampling.spec import CONSISTENCY

__all__ = ["SCMConfig", "SCM", "TimeWeighting", "WEIGHTINGS"]

WEIGHTINGS: tuple[str, ...] = ("none", "adaptive", "learned")




class TimeWeighting(nn.Module):
    r"""sCM's learned log-weight :math:`w_\phi(t)`: a linear layer on a sinusoidal embedding of t (zero init)."""

    def __init__(self, emb_dim: int = 32) -> None:
        super().__init__()
        self.emb = SinusoidalEmbedding(emb_dim, max_freq=8.0)
        self.linear = nn.Linear(emb_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        """Log-weights of shape (B,) for times t of shape (B,)."""
        return self.linear(self.emb(t).to(self.linear.weight.dtype))[:, 0]


@dataclass
class SCMConfig(FlowMapTrainConfig):
    """sCM hyper-parameters (plus those of :class:`FlowMapTrainConfig`).

    Attributes:
        tangent_norm_c: Constant c of the tangent normalisation g/(|g|+c); <= 0 disables it.
        warmup_steps: Steps over which the tangent warm-up r rises from 0 to 1 (0: r = 1 from the start).
        t_min: Smallest training time (must be > 0 for a consistency model).
        weighting: ``none``, ``adaptive`` (MeanFlow-style e/sg((e+eps)^p)) or ``learned`` (sCM's w_phi(t)).
        norm_p: Power of the adaptive weight.
        norm_eps: Constant of the adaptive weight.
        t_one_fraction: Fraction of rows trained at exactly t = t_max (the 1-step jump; see
            :func:`consistency_time`).
    """

    t_min: float = 1e-3
    tangent_norm_c: float = 0.1
    warmup_steps: int = 1000
    weighting: str = "none"
    norm_p: float = 1.0
    norm_eps: float = 1e-2
    t_one_fraction: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.t_one_fraction <= 1.0:
            raise ValueError(f"t_one_fraction must lie in [0, 1]; got {self.t_one_fraction}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.t_min <= 0.0:
            raise ValueError("sCM needs t_min > 0 (the consistency boundary t=0 carries no signal); "
                             f"got t_min={self.t_min}")


@register
class SCM(FlowMapTrainMethod):
    """Continuous consistency model (sCD with a teacher, sCT from data) with tangent normalisation + warm-up."""

    name = "scm"
    description = "sCM: continuous consistency model f = x - tF(x,t,0) via the JVP df/dt, tangent normalisation."
    config_class = SCMConfig
    parameterization = "consistency"
    sampler = CONSISTENCY  # multi-step: jump to data, re-noise with fresh noise (gamma = 1)

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, config: SCMConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        self.weight_net = TimeWeighting() if self.config.weighting == "learned" else None
        self._cache: tuple[Tensor, Tensor] | None = None

    def trainable(self) -> dict[str, nn.Module]:
        """The student, plus the weighting network when ``weighting="learned"``."""
        out: dict[str, nn.Module] = {"student": self.student}
        if self.weight_net is not None:
            out["weighting"] = self.weight_net
        return out

    def schedule(self, step: int) -> list[str]:
        """Student every step; the learned weighting right after it (on the student's cached errors)."""
        return ["student", "weighting"] if self.weight_net is not None else ["student"]

    def tangent(self, x_t: Tensor, t: Tensor, v: Tensor, cond: Tensor | None, r: float) -> tuple[Tensor, Tensor]:
        r"""Return (F^-, g) with :math:`g = F^- - (v - r\,t\,dF^-/dt)` (un-normalised), both detached."""
        F_m, dF = self.student_jvp(x_t, t, torch.zeros_like(t), (v, torch.ones_like(t), torch.zeros_like(t)), cond)
        return F_m, F_m - (v - r * bcast(t, v) * dF)

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """sCM loss for the student, or the learned-weighting loss for ``name="weighting"``."""
        if name == "weighting":
            return self._weighting_loss()
        if name != "student":
            raise ValueError(f"unknown network {name!r} for method 'scm'; expected 'student' or 'weighting'")
        cfg = self.config
        t = consistency_time(batch.u, cfg, cfg.t_one_fraction)
        x_t, dx = self.noisy_input(batch, t)
        cond = self.drop_labels(batch)
        v = self.velocity(x_t, t, dx, cond)
        r = warmup_ratio(step, cfg.warmup_steps)
        F_m, g = self.tangent(x_t, t, v, cond, r)
        target = F_m - tangent_normalize(g, cfg.tangent_norm_c)
        pred = self.student.F(x_t, t, 0.0, cond)
        err = sq_norm(pred - target)
        if cfg.weighting == "adaptive":
            loss = adaptive_weight(err, cfg.norm_p, cfg.norm_eps).mean()
        elif cfg.weighting == "learned":
            assert self.weight_net is not None
            with torch.no_grad():
                w = self.weight_net(t)
            loss = (torch.exp(w) * err / count_dims(x_t)).mean()
            self._cache = (t.detach(), err.detach() / count_dims(x_t))
        else:
            loss = err.mean()
        return loss, {"loss": float(loss.detach()), "mse": float(err.detach().mean()),
                      "tangent_norm": float(sq_norm(g).sqrt().mean()),
                      "warmup_r": r}

    def _weighting_loss(self) -> tuple[Tensor, dict[str, float]]:
        r"""sCM's weighting objective :math:`E[e^{w_\phi(t)} \bar e - w_\phi(t)]` on the cached student errors."""
        if self.weight_net is None:
            raise ValueError("the weighting network exists only with weighting='learned'")
        if self._cache is None:
            raise ValueError("the weighting loss needs a student loss evaluated first (schedule order)")
        t, e = self._cache
        w = self.weight_net(t)
        loss = (torch.exp(w) * e - w).mean()
        return loss, {"weighting_loss": float(loss)}
