r"""CDM: continuous-time distribution matching (Liu et al. 2026, arXiv 2605.06376).

The student is a velocity model,
:math:`\hat x_0^S = f_{\sigma\to0}(x_\sigma) = x_\sigma - \sigma u_\theta(x_\sigma,\sigma)`.
Each student step draws a schedule, backward-simulates the student to a random anchor
:math:`(x_\sigma, \sigma, v_\sigma)` and minimises

.. math::
    L = w_{CA} L_{CA} + w_{DM} L_{DM} + w_{CDM} L_{CDM},

where :math:`L_{CA}, L_{DM}` are the decoupled-DMD terms at the anchor (see :mod:`fewstep.methods.ddmd`) and the
off-trajectory term is the DM loss at an extrapolated point

.. math::
    x_s = x_\sigma + (\sigma_s - \sigma)\,v_\sigma\ \ (\text{Euler}),\qquad
    x_s = (1-\sigma_s)\,sg(\hat x_0^S) + \sigma_s\epsilon\ \ (\text{Gaussian}),\qquad \sigma_s\sim U[0.02,0.98],

    L_{CDM} = L_{DM}\big(\hat x_0^S(x_s)\big),\quad \hat x_0^S(x_s) = f_{\sigma_s\to0}(x_s),

re-noised at an independent :math:`\tau \sim U[0.02, 0.98]`. Because :math:`v_\sigma = (x_\sigma - \hat x_0^S)/\sigma`,
Euler extrapolation re-uses the trajectory's implied noise :math:`\hat x_1`; the Gaussian variant (our reading
of the paper's ablation) draws fresh noise. Schedules: ``dynamic`` draws N ~ U{N_min..N_max} and N−1 inner
times U(a, b) sorted descending after 1.0 (``fixed``: the uniform n_steps grid). The fake score is trained
online (``fake_updates`` per student step) and optionally EMA-merged from the student (``fake_ema``).

Defaults that differ from the CDM code (both measured in docs/results/dmd.md): the fake score is fitted to the
student's n_steps samples (``fake_samples="final"``; the code fits it to the x0-predictions at the random
anchors, whose mixture includes the poor early-anchor predictions, so DM then drags the final samples the other
way), and CA is normalised by the guided distance :math:`\mathrm{mean}|\hat x_0^{cfg} - \hat x_0^S|`
(``ca_norm="cfg"``; the code uses its own :math:`\mathrm{mean}|\hat x_0^c - \hat x_0^S|`).
``offtraj_fake`` picks the fake score of the off-trajectory term (default ``split``: the fake copy of the bin of
:math:`\sigma_s`, fitted to on-trajectory anchors only); ``fit`` also fits those copies to the off-trajectory
predictions; ``own`` adds a dedicated copy of the fake (split as the fake is) fitted to the off-trajectory predictions
only, ``shared`` one unsplit dedicated copy for every :math:`\sigma_s` (docs/results/cdm_offtraj.md).
``dm_at="final"`` moves the DM and off-trajectory terms to the final anchor of the fixed n_steps schedule (CA stays
at the random anchor); measured in docs/results/dm_targets_mechanisms.md (section 5): it stops the w = 1 drift of
the n_steps output but leaves the other step counts untrained and does not help at w > 1, so ``dm_at="every"`` is
the default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.utils import bcast
from fewstep.methods._shared.ca_dm import CADMConfig, CADMMethod
from fewstep.methods._shared.dm import (
    Anchor,
    dynamic_schedule,
    fake_score_loss,
    fixed_schedule,
    renoise,
    renoise_time,
)
from fewstep.methods._shared.split_fake import SplitFake
from fewstep.methods.base import U_AUX, U_CORNER, Batch
from fewstep.methods.registry import register

__all__ = ["CDM", "CDMConfig"]

SCHEDULES: tuple[str, ...] = ("dynamic", "fixed")
PERTURBATIONS: tuple[str, ...] = ("euler", "gaussian")
OFFTRAJ_FAKES: tuple[str, ...] = ("split", "fit", "own", "shared")


@dataclass
class CDMConfig(CADMConfig):
    """Hyper-parameters of CDM (see also :class:`~fewstep.methods._shared.ca_dm.CADMConfig`).

    Attributes:
        schedule: ``dynamic`` (random length, continuous times) or ``fixed`` (uniform n_steps grid).
        n_min: Smallest schedule length N_min of the dynamic schedule (N ~ U{N_min..N_max}).
        n_max: Largest schedule length N_max of the dynamic schedule.
        inner_min: Lower end a of the inner schedule times U(a, b).
        inner_max: Upper end b of the inner schedule times.
        off_trajectory: Whether to add the off-trajectory CDM term.
        perturbation: ``euler`` (extrapolate along the student's velocity) or ``gaussian`` (fresh noise).
        cdm_weight: Weight w_CDM of the off-trajectory term.
        offtraj_fake: Fake score of the off-trajectory term: ``split`` (the fake routed by σ_s, fitted to the
            anchors only), ``fit`` (the same, also fitted to the off-trajectory predictions by σ_s), ``own`` (a
            dedicated copy of the fake, split as it is, fitted to the off-trajectory predictions only) or ``shared``
            (one unsplit dedicated copy for every σ_s, fitted to the off-trajectory predictions only).
    """

    schedule: str = "dynamic"
    n_min: int = 1
    n_max: int = 8
    inner_min: float = 0.25
    inner_max: float = 0.95
    off_trajectory: bool = True
    perturbation: str = "euler"
    cdm_weight: float = 1.0
    offtraj_fake: str = "split"


@register
class CDM(CADMMethod):
    """CDM: CA + DM on a dynamic continuous schedule, plus off-trajectory DM on extrapolated latents."""

    name = "cdm"
    description = "CDM: continuous-time distribution matching (dynamic schedule + off-trajectory DM, CA + DM)."
    config_class = CDMConfig
    parameterization = "velocity"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"unknown CDM schedule {cfg.schedule!r}; expected one of {SCHEDULES}")
        if cfg.perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown CDM perturbation {cfg.perturbation!r}; expected one of {PERTURBATIONS}")
        if not 1 <= cfg.n_min <= cfg.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max; got n_min={cfg.n_min}, n_max={cfg.n_max}")
        if not 0.0 < cfg.inner_min <= cfg.inner_max < 1.0:
            raise ValueError(f"need 0 < inner_min <= inner_max < 1; got ({cfg.inner_min}, {cfg.inner_max})")
        if cfg.offtraj_fake not in OFFTRAJ_FAKES:
            raise ValueError(f"unknown CDM offtraj_fake {cfg.offtraj_fake!r}; expected one of {OFFTRAJ_FAKES}")
        self.fake_off: nn.Module | None = None
        if cfg.offtraj_fake in ("own", "shared"):
            if cfg.fake_ema > 0:
                raise ValueError(f"offtraj_fake={cfg.offtraj_fake!r} fits its own copy of the fake; a fake_ema merge "
                                 "of the student into it is not defined: use fake_ema = 0")
            own = cfg.offtraj_fake == "own" or not isinstance(self.fake, SplitFake)
            self.fake_off = copy.deepcopy(self.fake if own else self.fake.copies[0])

    def trainable(self) -> dict[str, nn.Module]:
        """Student and fake; a dedicated off-trajectory fake (``own``/``shared``) trains with the fake."""
        if self.fake_off is None:
            return super().trainable()
        return {"student": self.student, "fake": nn.ModuleList([self.fake, self.fake_off])}

    def offtraj_fake_for(self, sigma_s: Tensor) -> Any:
        """The fake score the off-trajectory term uses for points at levels ``sigma_s`` (``offtraj_fake``)."""
        off = self.fake_off
        if off is None:
            return self.fake_for(sigma_s)
        return off.route(sigma_s) if isinstance(off, SplitFake) else off

    def offtraj_prediction(self, a: Anchor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(σ_s, x̂0^S(x_s)): the off-trajectory level drawn from ``U_AUX`` and the student's prediction there."""
        cfg = self.config
        sigma_s = renoise_time(batch.u[:, U_AUX], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
        x_s = self.off_trajectory_point(a.x, a.sigma, a.velocity, a.x0, sigma_s)
        return sigma_s, self.student(x_s, sigma_s, torch.zeros_like(sigma_s), cond=batch.cond)

    def fake_loss(self, batch: Batch, anchor: Anchor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The fake's flow matching on its anchors, plus (``offtraj_fake`` fit/own/shared) on the off-trajectory
        predictions made from the anchors the off-trajectory term uses (re-noised at a level from ``U_CORNER``)."""
        cfg = self.config
        a = self.fake_anchor(batch) if anchor is None else anchor
        loss, logs = super().fake_loss(batch, a)
        if cfg.offtraj_fake == "split" or not cfg.off_trajectory or cfg.cdm_weight == 0:
            return loss, logs
        # the fake step's anchor is the one the off-trajectory term acts at: the random anchor (every/anchor) or the
        # final anchor of the fixed schedule (final/final); otherwise draw that one
        reuse = (cfg.dm_at, self.fake_samples) in (("every", "anchor"), ("final", "final"))
        a_off = a if reuse else self.anchor(batch, grad=False, final=cfg.dm_at == "final")
        with torch.no_grad():
            sigma_s, x0_s = self.offtraj_prediction(a_off, batch)
        tau = renoise_time(batch.u[:, U_CORNER], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
        off = fake_score_loss(self.offtraj_fake_for(sigma_s), x0_s, tau, torch.randn_like(x0_s), batch.cond)
        logs["fake_off_loss"] = float(off.detach())
        return loss + off, logs

    def student_schedule(self) -> Tensor:
        """A fresh dynamic schedule (global RNG) or the fixed uniform grid."""
        cfg = self.config
        if cfg.schedule == "fixed":
            return fixed_schedule(cfg.n_steps)
        return dynamic_schedule(cfg.n_max, cfg.inner_min, cfg.inner_max, n_min=cfg.n_min)

    def off_trajectory_point(self, x: Tensor, sigma: Tensor, velocity: Tensor, x0: Tensor,
                             sigma_s: Tensor) -> Tensor:
        r"""The off-trajectory point (no gradient).

        Euler :math:`x_\sigma + (\sigma_s - \sigma) v_\sigma` or Gaussian :math:`(1-\sigma_s) x_0 + \sigma_s\epsilon`.
        """
        if self.config.perturbation == "euler":
            return (x + bcast(sigma_s - sigma, x) * velocity).detach()
        return renoise(x0.detach(), sigma_s, torch.randn_like(x0)).detach()

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        a = self.anchor(batch, grad=True)
        a_dm = self.dm_anchor(batch, a)  # ``dm_at``: the DM and off-trajectory terms act here, CA at ``a``
        loss, logs = self.ca_dm_loss(a, batch, a_dm)
        if cfg.off_trajectory and cfg.cdm_weight != 0:
            sigma_s, x0_s = self.offtraj_prediction(a_dm, batch)
            cdm, _, _ = self.dm_term(x0_s, sigma_s, batch.u[:, U_CORNER], batch.cond,
                                     fake=self.offtraj_fake_for(sigma_s))
            loss = loss + cfg.cdm_weight * cdm
            logs["cdm_loss"] = float(cdm.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs
