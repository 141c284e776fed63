r"""The base of the flow-map training methods: noisy inputs, teacher-or-data velocity with guidance, the student's
JVP (:class:`FlowMapTrainConfig`, :class:`FlowMapTrainMethod`; sCM, FACM) and the average-velocity methods' draw
of t, s, x_t and labels (:class:`AverageVelocityConfig`, :class:`AverageVelocityMethod`; MeanFlow, SplitMeanFlow,
AYF). The velocity v in every target is the teacher's :math:`v_\phi(x_t,t)` (distillation) or :math:`x_1 - x_0`
on :math:`x_t=(1-t)x_0+t x_1` (training from data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.jvp import JVP_MODES, jvp
from fewstep.core.paths import LinearPath
from fewstep.core.timesteps import TIME_SAMPLERS
from fewstep.core.utils import bcast
from fewstep.methods._shared.flowmap_helpers import sample_t_s
from fewstep.methods.base import U_LABEL_DROP, Batch, Method, MethodConfig, drop_labels

__all__ = ["FlowMapTrainConfig", "FlowMapTrainMethod", "AverageVelocityConfig", "AverageVelocityMethod"]


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
        guidance: Teacher CFG weight applied for t in [guidance_t_min, guidance_t_max].
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
    guidance: float = 1.0
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
        return self.teacher is not None and bool(self.config.use_teacher)

    @classmethod
    def uses_teacher(cls, config: FlowMapTrainConfig) -> bool:
        """A teacher is used when ``use_teacher`` is set (default): distillation instead of training from data."""
        return cls.needs_teacher or bool(config.use_teacher)

    def noisy_input(self, batch: Batch, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x_t, x1 - x0) for x_t = (1-t) x0 + t x1; needs data."""
        if batch.x0 is None:
            raise ValueError(f"method {self.name!r} needs data batches (x0) to build x_t = (1-t) x0 + t x1")
        return LinearPath().sample(batch.x0, batch.x1, t)

    def drop_labels(self, batch: Batch) -> Tensor | None:
        """Class labels with a fraction ``cond_drop`` replaced by -1 (column ``U_LABEL_DROP``)."""
        return drop_labels(batch.cond, batch.u[:, U_LABEL_DROP], self.config.cond_drop)

    def in_guidance_range(self, t: Tensor) -> Tensor:
        """Boolean mask of rows with t in [guidance_t_min, guidance_t_max]."""
        return (t >= self.config.guidance_t_min) & (t <= self.config.guidance_t_max)

    def velocity(self, x_t: Tensor, t: Tensor, dx: Tensor, cond: Tensor | None) -> Tensor:
        r"""The velocity v in every target: teacher :math:`v_\phi` (CFG on the guided t-range) or x1 - x0."""
        if not self.distilling:
            return dx
        w = self.config.guidance
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
