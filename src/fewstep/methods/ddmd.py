r"""Decoupled DMD: the CFG-augmentation (CA) and distribution-matching (DM) terms with their own schedules.

Substituting the guided real score :math:`s_u + \alpha(s_c - s_u)` into DMD splits its gradient into
:math:`\nabla L_{DMD}(\text{cfg }\alpha) = \nabla L_{DM} + (\alpha-1)\nabla L_{CA}` (Liu et al. 2025). In x0 space, at an
anchor with :math:`\hat x_0^S = f_{\sigma\to0}(x_\sigma)` and re-noised points
:math:`x_{\tau} = (1-\tau)sg(\hat x_0^S) + \tau\epsilon`:

.. math::
    L_{DM} = \tfrac12\|\hat x_0^S - sg(\hat x_0^S - (\hat x_0^f - \hat x_0^c)/n_{DM})\|^2,\quad \tau_{DM}\sim U[0.02,0.98],

    L_{CA} = \tfrac12\|\hat x_0^S - sg(\hat x_0^S + (\alpha-1)(\hat x_0^c - \hat x_0^u)/n_{CA})\|^2,\quad
    \tau_{CA}\sim U(0, \sigma)\ \text{clamped to}\ [0.02, 0.98],

with :math:`n = \max(\mathrm{mean}|\hat x_0^c - sg(\hat x_0^S)|, \text{floor})` per sample, and the total
:math:`L = w_{DM} L_{DM} + w_{CA} L_{CA}`. DM uses the *conditional* real teacher (no guidance): alone, it
drives the student to the teacher's CFG-free conditional distribution; CA adds the guidance direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Batch, register
from .dmd import DistributionMatchingMethod, DMConfig
from .dmd_common import Anchor, ca_loss, dm_loss, dm_terms, renoise, renoise_time, teacher_x0

__all__ = ["DecoupledDMD", "DecoupledDMDConfig"]


@dataclass
class DecoupledDMDConfig(DMConfig):
    """Hyper-parameters of decoupled DMD (see also :class:`DMConfig`).

    Attributes:
        guidance: CFG weight α; the CA term enters with weight (α − 1).
        ca_weight: Weight w_CA of the CA term.
        dm_weight: Weight w_DM of the DM term.
        ca_renoise: Re-noise schedule of the CA term: ``uniform_capped`` (U(0, σ)) or ``uniform``.
        dm_renoise: Re-noise schedule of the DM term: ``uniform`` or ``uniform_capped``.
        n_steps: Steps of the student's fixed schedule (backward simulation).
        fake_updates: Fake-score steps per student step.
    """

    guidance: float = 3.0
    ca_weight: float = 1.0
    dm_weight: float = 1.0
    ca_renoise: str = "uniform_capped"
    dm_renoise: str = "uniform"
    n_steps: int = 4
    fake_updates: int = 2


@register
class DecoupledDMD(DistributionMatchingMethod):
    """Decoupled DMD: (α−1)·CA + DM with separate re-noise schedules and weights."""

    name = "ddmd"
    description = "Decoupled DMD: CFG-augmentation (spear) + distribution matching (shield), own schedules."
    config_class = DecoupledDMDConfig
    parameterization = "velocity"
    needs_teacher = True
    needs_data = False

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        for key in ("ca_renoise", "dm_renoise"):
            kind = getattr(self.config, key)
            if kind not in ("uniform", "uniform_capped"):
                raise ValueError(f"config key {key}={kind!r} is not a re-noise schedule; "
                                 "expected 'uniform' or 'uniform_capped'")

    def dm_term(self, x0_student: Tensor, sigma: Tensor, u: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """L_DM of the student's x0-prediction with the conditional real teacher; returns (loss, g)."""
        cfg = self.config
        tau = renoise_time(u, cfg.dm_renoise, sigma, cfg.t_min, cfg.t_max)
        x0_real, x0_fake = dm_terms(self.teacher, self.fake, x0_student, tau, cond, 1.0)
        return dm_loss(x0_student, x0_real, x0_fake, cfg.norm_floor, "dmd2")

    def ca_term(self, x0_student: Tensor, sigma: Tensor, u: Tensor, cond: Tensor | None) -> Tensor:
        """L_CA with scale (α − 1); zero without labels (conditional = unconditional)."""
        cfg = self.config
        if cond is None or cfg.guidance == 1.0:
            return x0_student.sum() * 0.0
        tau = renoise_time(u, cfg.ca_renoise, sigma, cfg.t_min, cfg.t_max)
        x_tau = renoise(x0_student.detach(), tau, torch.randn_like(x0_student))
        x0_c = teacher_x0(self.teacher, x_tau, tau, cond)
        x0_u = teacher_x0(self.teacher, x_tau, tau, torch.full_like(cond, -1))
        return ca_loss(x0_student, x0_c, x0_u, cfg.guidance - 1.0, cfg.norm_floor)

    def ca_dm_loss(self, a: Anchor, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """w_CA·L_CA + w_DM·L_DM at anchor ``a`` (terms with weight 0 are skipped)."""
        cfg = self.config
        total = a.x0.sum() * 0.0
        logs: dict[str, float] = {}
        if cfg.dm_weight != 0:
            dm, g = self.dm_term(a.x0, a.sigma, batch.u[:, 1], batch.cond)
            total = total + cfg.dm_weight * dm
            logs.update(dm_loss=float(dm.detach()), dm_grad_rms=float(g.pow(2).mean().sqrt()))
        if cfg.ca_weight != 0:
            ca = self.ca_term(a.x0, a.sigma, batch.u[:, 2], batch.cond)
            total = total + cfg.ca_weight * ca
            logs["ca_loss"] = float(ca.detach())
        return total, logs

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        a = self.anchor(batch, grad=True)
        loss, logs = self.ca_dm_loss(a, batch)
        logs["loss"] = float(loss.detach())
        return loss, logs
