r"""Flow matching: train a velocity field (a teacher, or a 1-RF student) from data.

Loss, on the linear path x_t = (1-t) x0 + t x1 with t ~ p(t):

.. math::
    L_{FM}(\theta) = E_{t, x_0, x_1}\, \| v_\theta(x_t, t, c) - (x_1 - x_0) \|^2,

with the class label replaced by the null label -1 with probability ``cond_drop`` so that the same
network gives conditional and unconditional velocities (classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fewstep.core.paths import LinearPath
from fewstep.core.timesteps import sample_time
from fewstep.methods.base import U_FM_LABEL_DROP, U_T, Batch, Method, MethodConfig, drop_labels
from fewstep.methods.registry import register


@dataclass
class FlowMatchingConfig(MethodConfig):
    """Hyper-parameters of flow matching.

    Attributes:
        time_sampler: ``uniform`` or ``logit_normal``.
        logit_mean: Location of the logit-normal time sampler.
        logit_std: Scale of the logit-normal time sampler.
        cond_drop: Probability of dropping the class label (for classifier-free guidance).
    """

    time_sampler: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond_drop: float = 0.1


@register
class FlowMatching(Method):
    """Conditional flow matching on the linear path (teacher training from data)."""

    name = "flow_matching"
    description = "Flow matching from data: trains a velocity field (a teacher, or 1-rectified flow)."
    config_class = FlowMatchingConfig
    parameterization = "velocity"
    needs_teacher = False
    needs_data = True

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.x0 is None:
            raise ValueError("flow_matching needs data batches (x0)")
        cfg = self.config
        t = sample_time(batch.u[:, U_T], cfg.time_sampler, mean=cfg.logit_mean, std=cfg.logit_std)
        x_t, v = LinearPath().sample(batch.x0, batch.x1, t)
        cond = drop_labels(batch.cond, batch.u[:, U_FM_LABEL_DROP], cfg.cond_drop)
        loss = ((self.student.velocity(x_t, t, cond) - v) ** 2).mean()
        return loss, {"loss": float(loss.detach())}
