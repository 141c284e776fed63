r"""DMD and DMD2: distribution-matching distillation with an online fake score.

Student loss at a backward-simulated anchor :math:`(x_\sigma, \sigma)` with
:math:`\hat x_0^S = f_{\sigma\to 0}(x_\sigma)`, re-noised :math:`x_\tau = (1-\tau)sg(\hat x_0^S) + \tau\epsilon`,
:math:`\tau \sim U[0.02, 0.98]`:

.. math::
    L_{DM} = \tfrac12\,\big\|\hat x_0^S - sg(\hat x_0^S - g)\big\|^2,\qquad
    g = \frac{\hat x_0^{fake} - \hat x_0^{real,w}}{\max(\mathrm{mean}|\hat x_0^{real,w} - \hat x_0^S|,\ \text{floor})},

where the real teacher is CFG-guided with weight w and the fake score is trained on student samples by
:math:`\|v_{fake}(x_\tau,\tau) - (\epsilon - sg(\hat x_0^S))\|^2`.

* ``dmd`` (Yin et al. 2024): :math:`L = L_{DM} + \lambda_{reg}\|f_{1\to0}(z) - y\|^2` on teacher ODE pairs
  (z, y = adaptive teacher solve of z from 1 to 0 with guidance w), generated once in ``prepare()``.
* ``dmd2`` (Yin et al. 2024b): no regression; two-time-scale rule with ``fake_updates`` fake steps per
  student step; multi-step students use backward simulation on their inference schedule. The GAN head of
  DMD2 is not implemented (it is optional and off in the paper's ablation "without GAN").

:class:`DistributionMatchingMethod` (also the base of ``ddmd`` and ``cdm``) owns the fake score, its update
ratio (``schedule`` returns ``fake_updates`` × "fake" then "student"), the optional EMA merge of the student
into the fake score, and backward simulation to a per-sample anchor drawn from ``batch.u[:, 0]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.sampling.samplers import sample_flowmap, solve_adaptive
from fewstep.methods.base import Batch, Method, MethodConfig
from fewstep.methods.registry import register
from fewstep.methods._shared.dm import (Anchor, anchor_index, backward_simulate, dm_loss, dm_terms, ema_merge, fake_score_loss,
                         fixed_schedule, make_fake_score, renoise_time)

__all__ = ["DMConfig", "DistributionMatchingMethod", "DMD", "DMD2", "DMDConfig", "DMD2Config"]


@dataclass
class DMConfig(MethodConfig):
    """Hyper-parameters shared by the distribution-matching family.

    Attributes:
        guidance: CFG weight α of the real teacher (1 = conditional, no guidance).
        n_steps: Steps of the student's fixed schedule [1, …, 0] used for backward simulation.
        fake_updates: Fake-score updates per student update (two-time-scale rule).
        norm_floor: Lower clamp of the per-sample normaliser mean|x̂0_real − x̂0_student|.
        t_min: Smallest re-noise level.
        t_max: Largest re-noise level.
        fake_ema: If > 0, merge the student into the fake score after each fake step with this decay.
        fake_samples: What the fake score is trained on: ``anchor`` (the x0-prediction at the same random
            backward-simulation anchor as the student loss, as in DMD2/CDM) or ``final`` (the student's output
            after the fixed ``n_steps`` inference schedule, i.e. its sampling distribution).
    """

    guidance: float = 1.0
    n_steps: int = 1
    fake_updates: int = 5
    norm_floor: float = 0.1
    t_min: float = 0.02
    t_max: float = 0.98
    fake_ema: float = 0.0
    fake_samples: str = "anchor"


FAKE_SAMPLES: tuple[str, ...] = ("anchor", "final")


class DistributionMatchingMethod(Method):
    """Base of DMD-family methods: owns the fake score, its FM loss, the update ratio and backward simulation.

    Args:
        student: The flow-map student.
        teacher: The frozen real teacher (``velocity(x, t, cond, guidance)``).
        config: A :class:`DMConfig` subclass instance.
        fake: Optional fake-score velocity network; default a copy of the student's backbone.
    """

    config_class = DMConfig

    def __init__(self, student: FlowMap, teacher: nn.Module | None = None, config: Any = None,
                 fake: nn.Module | None = None) -> None:
        super().__init__(student, teacher, config)
        cfg = self.config
        if cfg.n_steps < 1 or cfg.fake_updates < 0:
            raise ValueError(f"need n_steps >= 1 and fake_updates >= 0; got n_steps={cfg.n_steps}, "
                             f"fake_updates={cfg.fake_updates}")
        if not 0.0 <= cfg.t_min <= cfg.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1; got t_min={cfg.t_min}, t_max={cfg.t_max}")
        if not 0.0 <= cfg.fake_ema < 1.0:
            raise ValueError(f"fake_ema must lie in [0, 1); got {cfg.fake_ema}")
        if cfg.fake_samples not in FAKE_SAMPLES:
            raise ValueError(f"config key fake_samples={cfg.fake_samples!r} is not valid; expected one of {FAKE_SAMPLES}")
        self.fake = fake if fake is not None else make_fake_score(student)

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake": self.fake}

    def schedule(self, step: int) -> list[str]:
        """``fake_updates`` fake-score steps, then one student step."""
        return ["fake"] * self.config.fake_updates + ["student"]

    def after_update(self, name: str, step: int) -> None:
        if name == "fake" and self.config.fake_ema > 0:
            ema_merge(self.fake, self.student, self.config.fake_ema)

    def student_schedule(self) -> Tensor:
        """The schedule used for backward simulation (fixed uniform by default)."""
        return fixed_schedule(self.config.n_steps)

    def anchor(self, batch: Batch, grad: bool = True, final: bool = False) -> Anchor:
        """Backward-simulate the student from ``batch.x1`` to an anchor drawn from ``batch.u[:, 0]``.

        With ``final`` the anchor is the last step of the fixed ``n_steps`` inference schedule, so its
        x0-prediction is the student's n_steps sample."""
        if final:
            sched = fixed_schedule(self.config.n_steps)
            idx = torch.full((batch.x1.shape[0],), self.config.n_steps - 1, dtype=torch.long, device=batch.x1.device)
        else:
            sched = self.student_schedule()
            idx = anchor_index(batch.u[:, 0], sched.numel() - 1)
        return backward_simulate(self.student, batch.x1, sched, idx, batch.cond, grad=grad)

    def fake_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Flow matching of the fake score on the student's x0-predictions (``fake_samples``), τ ~ U[t_min, t_max]."""
        a = self.anchor(batch, grad=False, final=self.config.fake_samples == "final")
        tau = renoise_time(batch.u[:, 6], "uniform", t_min=self.config.t_min, t_max=self.config.t_max)
        loss = fake_score_loss(self.fake, a.x0, tau, torch.randn_like(a.x0), batch.cond)
        return loss, {"fake_loss": float(loss.detach())}

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if name == "fake":
            return self.fake_loss(batch)
        if name == "student":
            return self.student_loss(batch, step)
        raise ValueError(f"method {self.name!r} trains 'student' and 'fake'; got {name!r}")

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """The generator loss (implemented by each method)."""
        raise NotImplementedError(f"{type(self).__name__} must implement student_loss()")


@dataclass
class DMD2Config(DMConfig):
    """Hyper-parameters of DMD2 (see :class:`DMConfig`; defaults: 5 fake updates, τ ~ U[0.02, 0.98])."""


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


class _DMStudentLoss(DistributionMatchingMethod):
    """The DM generator loss with the guided real teacher (shared by dmd and dmd2)."""

    parameterization = "consistency"
    needs_teacher = True
    needs_data = False

    def dm_student_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """L_DM at a backward-simulated anchor with the real teacher guided by ``config.guidance``."""
        cfg = self.config
        a = self.anchor(batch, grad=True)
        tau = renoise_time(batch.u[:, 1], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
        x0_real, x0_fake = dm_terms(self.teacher, self.fake, a.x0, tau, batch.cond, cfg.guidance)
        loss, g = dm_loss(a.x0, x0_real, x0_fake, cfg.norm_floor, "dmd2")
        return loss, {"dm_loss": float(loss.detach()), "dm_grad_rms": float(g.pow(2).mean().sqrt())}


@register
class DMD2(_DMStudentLoss):
    """DMD2: DM loss with a two-time-scale fake score and backward simulation (no GAN head)."""

    name = "dmd2"
    description = "DMD2: distribution matching with a two-time-scale fake score, backward simulation, no regression."
    config_class = DMD2Config

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        loss, logs = self.dm_student_loss(batch)
        logs["loss"] = float(loss.detach())
        return loss, logs


@register
class DMD(_DMStudentLoss):
    """DMD (v1): DM loss plus L2 regression on teacher ODE pairs generated once in prepare()."""

    name = "dmd"
    description = "DMD: distribution matching plus regression to cached teacher ODE pairs (noise -> endpoint)."
    config_class = DMDConfig

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
        gen = torch.Generator().manual_seed(int(context.get("seed", 0)) + 7919)
        z = torch.randn((cfg.num_pairs, *shape), generator=gen).to(p.device, p.dtype)
        ncls = getattr(self.teacher, "num_classes", None)
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
        idx = (batch.u[:, 5] * z.shape[0]).long().clamp(0, z.shape[0] - 1).to(z.device)
        out = sample_flowmap(self.student, z[idx], self.config.n_steps, cond=None if c is None else c[idx]).x
        return ((out - y[idx]) ** 2).mean()

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        dm, logs = self.dm_student_loss(batch)
        reg = self.regression_loss(batch)
        loss = dm + self.config.reg_weight * reg
        logs.update(reg_loss=float(reg.detach()), loss=float(loss.detach()))
        return loss, logs
