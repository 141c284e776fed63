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
for t in [guidance_t_min, guidance_t_max]; with a teacher the teacher's CFG weight ``teacher_guidance`` is used
on that t-range instead.

This module also holds the helpers shared by SplitMeanFlow, sCM, FACM and AYF (time sampling, adaptive
weight, tangent normalisation, warm-up and the teacher-or-data velocity) and the base of the average-velocity
methods (:class:`AverageVelocityConfig`, :class:`AverageVelocityMethod`: one ``draw`` of t, s, x_t and labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fewstep.core.jvp import JVP_MODES, jvp
from fewstep.core.paths import LinearPath
from fewstep.core.timesteps import TIME_SAMPLERS, sample_time
from fewstep.core.utils import bcast
from fewstep.methods.base import Batch, Method, MethodConfig
from fewstep.methods.registry import register

__all__ = ["FlowMapTrainConfig", "FlowMapTrainMethod", "AverageVelocityConfig", "AverageVelocityMethod",
           "MeanFlowConfig", "MeanFlow", "sample_t_s", "adaptive_weight", "tangent_normalize", "warmup_ratio",
           "sq_norm"]


# ---------------------------------------------------------------------------------------------- helpers
def sq_norm(x: Tensor) -> Tensor:
    r"""Per-sample squared norm :math:`\|x_i\|^2` summed over the event dimensions, shape (B,)."""
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


def adaptive_weight(delta: Tensor, p: float, c: float) -> Tensor:
    r"""MeanFlow's adaptive loss :math:`\Delta / \mathrm{sg}((\Delta + c)^p)` per sample (p = 0: plain Δ).

    Its gradient is that of :math:`\Delta` scaled by :math:`(\Delta + c)^{-p}`, so p = 1 behaves like a
    robust (log-like) loss that stops outliers from dominating.
    """
    if p == 0:
        return delta
    return delta / (delta.detach() + c).pow(p)


def tangent_normalize(g: Tensor, c: float) -> Tensor:
    r"""sCM tangent normalisation :math:`g / (\|g\| + c)` with the per-sample L2 norm (c <= 0: no-op)."""
    if c <= 0:
        return g
    return g / bcast(g.reshape(g.shape[0], -1).norm(dim=1) + c, g)


def warmup_ratio(step: int, warmup_steps: int, r_max: float = 1.0) -> float:
    r"""Linear tangent warm-up :math:`r = r_{max}\min(1, \text{step}/\text{warmup\_steps})` (r_max if no warm-up)."""
    if warmup_steps <= 0:
        return float(r_max)
    return float(r_max) * min(1.0, max(step, 0) / warmup_steps)


def sample_t_s(u: Tensor, kind: str, mean: float, std: float, equal_fraction: float, t_min: float = 0.0,
               t_max: float = 1.0, corner_fraction: float = 0.0,
               zero_fraction: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""Draw (t, s) with :math:`t \ge s`: two draws from p(t), ordered; then s = t, s = t_min or the corner.

    Rows with :math:`u_2 <` ``equal_fraction`` get s = t. Rows with :math:`u_5 <` ``zero_fraction`` get
    s = t_min with their drawn t (a jump to data, the last jump of every sampler; overrides s = t). Rows with
    :math:`u_4 <` ``corner_fraction`` get the longest jump :math:`(t, s) = (t_{max}, t_{min})` (= (1, 0) by
    default), the one a 1-step sampler takes; the corner overrides both.

    Args:
        u: Uniforms of shape (B, >=3) (>= 5 when corner_fraction > 0, >= 6 when zero_fraction > 0); columns
            0, 1 give the two times, column 2 the s = t choice, column 4 the corner choice, column 5 the s = t_min
            choice.
        kind: ``uniform`` or ``logit_normal``.
        mean: Logit-normal location.
        std: Logit-normal scale.
        equal_fraction: Fraction of rows with s = t (before the corner rows).
        t_min: Smallest time.
        t_max: Largest time.
        corner_fraction: Fraction of rows at (t_max, t_min).
        zero_fraction: Fraction of rows with s = t_min and t from p(t).
    """
    if not all(0.0 <= f <= 1.0 for f in (equal_fraction, corner_fraction, zero_fraction)):
        raise ValueError(f"equal_fraction, corner_fraction and zero_fraction must lie in [0, 1]; got "
                         f"{equal_fraction}, {corner_fraction}, {zero_fraction}")
    a = sample_time(u[:, 0], kind, t_min, t_max, mean, std)
    b = sample_time(u[:, 1], kind, t_min, t_max, mean, std)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    s = torch.where(u[:, 2] < equal_fraction, t, s)
    if zero_fraction > 0:
        if u.shape[1] < 6:
            raise ValueError(f"zero_fraction > 0 needs uniforms u of shape (B, >=6); got {tuple(u.shape)}")
        s = torch.where(u[:, 5] < zero_fraction, torch.full_like(s, t_min), s)
    if corner_fraction > 0:
        if u.shape[1] < 5:
            raise ValueError(f"corner_fraction > 0 needs uniforms u of shape (B, >=5); got {tuple(u.shape)}")
        corner = u[:, 4] < corner_fraction
        t = torch.where(corner, torch.full_like(t, t_max), t)
        s = torch.where(corner, torch.full_like(s, t_min), s)
    return t, s


# ---------------------------------------------------------------------------------------------- base
@dataclass
class FlowMapTrainConfig(MethodConfig):
    """Options shared by the JVP / flow-map methods.

    Attributes:
        time_sampler: ``uniform`` or ``logit_normal``.
        logit_mean: Logit-normal location.
        logit_std: Logit-normal scale.
        t_min: Smallest training time.
        t_max: Largest training time.
        jvp_mode: ``func``, ``fd`` or ``autograd`` (see :mod:`fewstep.core.jvp`).
        jvp_eps: Finite-difference step for ``jvp_mode="fd"``.
        use_teacher: Use the teacher's velocity when a teacher is given (False: x1 - x0 from data).
        teacher_guidance: Teacher CFG weight applied for t in [guidance_t_min, guidance_t_max].
        guidance_t_min: Lower end of the guided time range.
        guidance_t_max: Upper end of the guided time range.
        cond_drop: Probability of replacing a class label by the null label -1.
    """

    time_sampler: str = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    jvp_mode: str = "func"
    jvp_eps: float = 1e-3
    use_teacher: bool = True
    teacher_guidance: float = 1.0
    guidance_t_min: float = 0.0
    guidance_t_max: float = 1.0
    cond_drop: float = 0.1

    def __post_init__(self) -> None:
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {TIME_SAMPLERS}; got {self.time_sampler!r}")
        if self.jvp_mode not in JVP_MODES:
            raise ValueError(f"jvp_mode must be one of {JVP_MODES}; got {self.jvp_mode!r}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={self.t_min}, t_max={self.t_max}")
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop must lie in [0, 1]; got {self.cond_drop}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive; got {self.logit_std}")


class FlowMapTrainMethod(Method):
    """Shared machinery: noisy inputs, teacher-or-data velocity with guidance, and the student's JVP."""

    config_class = FlowMapTrainConfig
    needs_teacher = False
    needs_data = True

    @property
    def distilling(self) -> bool:
        """Whether the velocity comes from the teacher (True) or from data x1 - x0 (False)."""
        return self.teacher is not None and bool(getattr(self.config, "use_teacher", True))

    def noisy_input(self, batch: Batch, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x_t, x1 - x0) for x_t = (1-t) x0 + t x1; needs data."""
        if batch.x0 is None:
            raise ValueError(f"method {self.name!r} needs data batches (x0) to build x_t = (1-t) x0 + t x1")
        return LinearPath().sample(batch.x0, batch.x1, t)

    def drop_labels(self, batch: Batch) -> Tensor | None:
        """Class labels with a fraction ``cond_drop`` replaced by -1 (uses u[:, 7])."""
        cond = batch.cond
        if cond is not None and self.config.cond_drop > 0:
            cond = torch.where(batch.u[:, 7] < self.config.cond_drop, torch.full_like(cond, -1), cond)
        return cond

    def in_guidance_range(self, t: Tensor) -> Tensor:
        """Boolean mask of rows with t in [guidance_t_min, guidance_t_max]."""
        return (t >= self.config.guidance_t_min) & (t <= self.config.guidance_t_max)

    def velocity(self, x_t: Tensor, t: Tensor, dx: Tensor, cond: Tensor | None) -> Tensor:
        r"""The velocity v in every target: teacher :math:`v_\phi` (CFG on the guided t-range) or x1 - x0."""
        if not self.distilling:
            return dx
        w = self.config.teacher_guidance
        v = self.velocity_target(x_t, t, cond)
        if cond is not None and w != 1.0:
            v_g = self.velocity_target(x_t, t, cond, guidance=w)
            v = torch.where(bcast(self.in_guidance_range(t), v), v_g, v)
        return v

    def student_fn(self, cond: Tensor | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """F(x, t, s) of the bare backbone with the parameterization's second time (no range checks)."""
        net = self.student.net
        network_s = self.student.network_s
        return lambda x, t, s: net(x, t, network_s(t, s), cond)

    def student_jvp(self, x: Tensor, t: Tensor, s: Tensor, tangents: tuple[Tensor, Tensor, Tensor],
                    cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """Detached (F, dF) with the configured JVP mode along ``tangents`` on (x, t, s)."""
        return jvp(self.student_fn(cond), (x, t, s), tangents, mode=self.config.jvp_mode, eps=self.config.jvp_eps)


# ---------------------------------------------------------------------------------------------- average velocity
@dataclass
class AverageVelocityConfig(FlowMapTrainConfig):
    """Options shared by the average-velocity methods (MeanFlow, SplitMeanFlow, AYF).

    Attributes:
        equal_fraction: Fraction of rows with s = t (flow-matching rows), drawn before the corner rows.
        corner_fraction: Fraction of rows at the longest jump (t, s) = (t_max, t_min), the 1-step jump
            (overrides the s = t choice; uses u[:, 4]). Default 0: on ring8 (docs/results/flowmap_a.md) corner
            rows made the 1-NFE MMD² of the JVP methods (MeanFlow, AYF-EMD, AYF-LMD) worse.
        zero_fraction: Fraction of rows with s = t_min (= 0) and t from the time sampler, i.e. jumps to data
            (uses u[:, 5]; overrides the s = t choice, the corner overrides it). Default 0 (the old sampler).
            With logit-normal(-0.4, 1) times, s = min of two draws lies below 0.05 on only 0.6 % of the rows,
            although every sampler's last jump ends at s = 0. Shipped: meanflow 0.4, ayf_emd 0.5, splitmeanflow
            0.25 with equal_fraction 0.5 (with fewer s = t rows SplitMeanFlow's self-referencing s = 0 targets
            diverge; docs/results/flowmap_a.md).
        norm_p: Power p of the adaptive weight Δ/sg((Δ + c)^p) (0 = plain squared error).
        norm_eps: Constant c of the adaptive weight.
    """

    equal_fraction: float = 0.5
    corner_fraction: float = 0.0
    zero_fraction: float = 0.0
    norm_p: float = 0.0
    norm_eps: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.equal_fraction <= 1.0:
            raise ValueError(f"equal_fraction must lie in [0, 1]; got {self.equal_fraction}")
        if not 0.0 <= self.corner_fraction <= 1.0:
            raise ValueError(f"corner_fraction must lie in [0, 1]; got {self.corner_fraction}")
        if not 0.0 <= self.zero_fraction <= 1.0:
            raise ValueError(f"zero_fraction must lie in [0, 1]; got {self.zero_fraction}")
        if self.norm_p < 0 or self.norm_eps <= 0:
            raise ValueError(f"need norm_p >= 0 and norm_eps > 0; got {self.norm_p}, {self.norm_eps}")


class AverageVelocityMethod(FlowMapTrainMethod):
    """Base of the average-velocity methods: one place that draws (t, s), x_t and the (dropped) labels."""

    config_class = AverageVelocityConfig
    parameterization = "average_velocity"

    def sample_times(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(t, s) of :func:`sample_t_s` with this config's sampler, fractions and time range (u[:, 0:6])."""
        cfg = self.config
        return sample_t_s(batch.u, cfg.time_sampler, cfg.logit_mean, cfg.logit_std, cfg.equal_fraction,
                          cfg.t_min, cfg.t_max, cfg.corner_fraction, cfg.zero_fraction)

    def draw(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """(t, s, x_t, x1 - x0, labels) of one batch: :meth:`sample_times`, ``noisy_input``, ``drop_labels``."""
        t, s = self.sample_times(batch)
        x_t, dx = self.noisy_input(batch, t)
        return t, s, x_t, dx, self.drop_labels(batch)


# ---------------------------------------------------------------------------------------------- MeanFlow
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
