r"""DMD: distribution-matching distillation with an online fake score plus regression on teacher ODE pairs.

Student loss at a backward-simulated anchor :math:`(x_\sigma, \sigma)` with
:math:`\hat x_0^S = f_{\sigma\to 0}(x_\sigma)`, re-noised :math:`x_\tau = (1-\tau)sg(\hat x_0^S) + \tau\epsilon`,
:math:`\tau \sim U[0.02, 0.98]`:

.. math::
    L_{DM} = \tfrac12\,\big\|\hat x_0^S - sg(\hat x_0^S - g)\big\|^2,\qquad
    g = \frac{\hat x_0^{fake} - \hat x_0^{real,w}}{\max(\mathrm{mean}|\hat x_0^{real,w} - \hat x_0^S|,\ \text{floor})},

where the real teacher is CFG-guided with weight w and the fake score is trained on student samples by
:math:`\|v_{fake}(x_\tau,\tau) - (\epsilon - sg(\hat x_0^S))\|^2`
(:class:`~fewstep.methods._shared.dm_base.DistributionMatchingMethod`).

``dmd`` (Yin et al. 2024): :math:`L = L_{DM} + \lambda_{reg}\|f_{1\to0}(z) - y\|^2` on teacher ODE pairs
(z, y = adaptive teacher solve of z from 1 to 0 with guidance w), generated once in ``prepare()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.methods._shared.dm_base import DistributionMatchingMethod, DMConfig
from fewstep.methods.base import U_ZERO, Batch
from fewstep.methods.registry import register
from fewstep.sampling.samplers import sample_flowmap, solve_adaptive

__all__ = ["DMD", "DMDConfig", "PAIR_SEED_OFFSET"]

PAIR_SEED_OFFSET = 7919  #: the regression pairs' generator is seeded with run seed + this (a prime, apart from the run)


@dataclass
class DMDConfig(DMConfig):
    """Hyper-parameters of DMD (v1).

    Attributes:
        reg_weight: Weight λ_reg of the regression loss on teacher ODE pairs.
        num_pairs: Number of (noise, teacher endpoint) pairs generated in prepare().
        pair_rtol: Relative/absolute tolerance of the adaptive teacher solve.
        fake_updates: Fake-score steps per student step (DMD v1 alternates, 1).
    """

    reg_weight: float = 0.25
    num_pairs: int = 4096
    pair_rtol: float = 1e-5
    fake_updates: int = 1


@register
class DMD(DistributionMatchingMethod):
    """DMD (v1): DM loss plus L2 regression on teacher ODE pairs generated once in prepare()."""

    name = "dmd"
    description = "DMD: distribution matching plus regression to cached teacher ODE pairs (noise -> endpoint)."
    config_class = DMDConfig
    parameterization = "consistency"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pairs: tuple[Tensor, Tensor, Tensor | None] | None = None

    def prepare(self, context: dict[str, Any]) -> None:
        """Generate ``num_pairs`` teacher ODE pairs (z, y, c) with the adaptive solver."""
        cfg = self.config
        if cfg.num_pairs < 1:
            raise ValueError(f"dmd needs num_pairs >= 1 regression pairs; got {cfg.num_pairs}")
        p = next(self.student.parameters())
        shape = tuple(getattr(self.teacher, "event_shape", context.get("event_shape", ())))
        gen = torch.Generator().manual_seed(int(context.get("seed", 0)) + PAIR_SEED_OFFSET)
        z = torch.randn((cfg.num_pairs, *shape), generator=gen).to(p.device, p.dtype)
        ncls = self.pair_classes()  # an unconditional student gets unconditional pairs (cond None)
        cond = torch.randint(0, ncls, (cfg.num_pairs,), generator=gen).to(p.device) if ncls else None
        kw: dict[str, Any] = {"cond": cond}
        if cfg.guidance != 1.0:
            kw["guidance"] = cfg.guidance
        with torch.no_grad():
            y = solve_adaptive(self.teacher, z, 1.0, 0.0, rtol=cfg.pair_rtol, atol=cfg.pair_rtol, **kw).x
        self.pairs = (z, y.to(p.dtype), cond)

    def regression_loss(self, batch: Batch) -> Tensor:
        r"""L2 regression :math:`\mathrm{mean}\|\mathrm{student}(z) - y\|^2` on cached pairs indexed by ``u[:, 5]``."""
        if self.pairs is None:
            raise ValueError("dmd regression pairs are missing: call method.prepare(context) before training")
        z, y, c = self.pairs
        idx = (batch.u[:, U_ZERO] * z.shape[0]).long().clamp(0, z.shape[0] - 1).to(z.device)
        out = sample_flowmap(self.student, z[idx], self.config.n_steps, cond=None if c is None else c[idx]).x
        return ((out - y[idx]) ** 2).mean()

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        dm, logs = self.dm_student_loss(batch)
        reg = self.regression_loss(batch)
        loss = dm + self.config.reg_weight * reg
        logs.update(reg_loss=float(reg.detach()), loss=float(loss.detach()))
        return loss, logs
