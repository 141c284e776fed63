r"""DMD2 (Yin et al. 2024b): distribution matching with a two-time-scale fake score and backward simulation.

The generator loss is the guided DM loss of :mod:`fewstep.methods.dmd` without regression,
:math:`L = \tfrac12\|\hat x_0^S - sg(\hat x_0^S - g)\|^2`, with ``fake_updates`` fake-score steps per student step;
multi-step students use backward simulation on their inference schedule. The GAN head of DMD2 is not
implemented (it is optional and off in the paper's ablation "without GAN").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fewstep.methods._shared.dm_base import DistributionMatchingMethod, DMConfig
from fewstep.methods.base import Batch
from fewstep.methods.registry import register

__all__ = ["DMD2", "DMD2Config"]


@dataclass
class DMD2Config(DMConfig):
    """Hyper-parameters of DMD2 (see :class:`DMConfig`; defaults: 5 fake updates, τ ~ U[0.02, 0.98])."""


@register
class DMD2(DistributionMatchingMethod):
    """DMD2: DM loss with a two-time-scale fake score and backward simulation (no GAN head)."""

    name = "dmd2"
    description = "DMD2: distribution matching with a two-time-scale fake score, backward simulation, no regression."
    config_class = DMD2Config
    parameterization = "consistency"

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        loss, logs = self.dm_student_loss(batch)
        logs["loss"] = float(loss.detach())
        return loss, logs
