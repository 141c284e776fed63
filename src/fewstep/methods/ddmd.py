r"""Decoupled DMD: the CFG-augmentation (CA) and distribution-matching (DM) terms with their own schedules.

Substituting the guided real score :math:`s_u + \alpha(s_c - s_u)` into DMD splits its gradient into
:math:`\nabla L_{DMD}(\text{cfg }\alpha) = \nabla L_{DM} + (\alpha-1)\nabla L_{CA}` (Liu et al. 2025).
In x0 space, at an
anchor with :math:`\hat x_0^S = f_{\sigma\to0}(x_\sigma)` and re-noised points
:math:`x_{\tau} = (1-\tau)sg(\hat x_0^S) + \tau\epsilon`:

.. math::
    L_{DM} = \tfrac12\|\hat x_0^S - sg(\hat x_0^S - (\hat x_0^f - \hat x_0^c)/n_{DM})\|^2,\quad
    \tau_{DM}\sim U[0.02,0.98],

    L_{CA} = \tfrac12\|\hat x_0^S - sg(\hat x_0^S + (\alpha-1)(\hat x_0^c - \hat x_0^u)/n_{CA})\|^2,\quad
    \tau_{CA}\sim U(0, \sigma)\ \text{clamped to}\ [0.02, 0.98],

with :math:`n = \max(\mathrm{mean}|\hat x_0^c - sg(\hat x_0^S)|, \text{floor})` per sample, and the total
:math:`L = w_{DM} L_{DM} + w_{CA} L_{CA}`. ``ca_norm`` picks :math:`n_{CA}`: ``separate`` (the CDM code: its own
:math:`\mathrm{mean}|\hat x_0^c - \hat x_0^S|` at :math:`\tau_{CA}`), ``dm`` (the DM term's :math:`n_{DM}`, so CA and DM
share one scale) or ``cfg`` (:math:`\max(\mathrm{mean}|\hat x_0^{cfg} - \hat x_0^S|, \text{floor})` at
:math:`\tau_{CA}` with :math:`\hat x_0^{cfg} = \hat x_0^u + \alpha(\hat x_0^c - \hat x_0^u)`, the coupled DMD2
normaliser). DM uses the *conditional* real teacher (no guidance): alone, it
drives the student to the teacher's CFG-free conditional distribution; CA adds the guidance direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fewstep.methods._shared.ca_dm import CADMConfig, CADMMethod
from fewstep.methods.base import Batch
from fewstep.methods.registry import register

__all__ = ["DecoupledDMD", "DecoupledDMDConfig"]


@dataclass
class DecoupledDMDConfig(CADMConfig):
    """Hyper-parameters of decoupled DMD (the CA + DM options of :class:`~fewstep.methods._shared.ca_dm.CADMConfig`)."""


@register
class DecoupledDMD(CADMMethod):
    """Decoupled DMD: (α−1)·CA + DM with separate re-noise schedules and weights."""

    name = "ddmd"
    description = "Decoupled DMD: CFG-augmentation (spear) + distribution matching (shield), own schedules."
    config_class = DecoupledDMDConfig
    parameterization = "velocity"

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        a = self.anchor(batch, grad=True)
        loss, logs = self.ca_dm_loss(a, batch, self.dm_anchor(batch, a))
        logs["loss"] = float(loss.detach())
        return loss, logs
