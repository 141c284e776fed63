r"""The shared base of decoupled DMD and CDM: the CFG-augmentation (CA) and distribution-matching (DM) terms.

With the guided real score :math:`s_u + \alpha(s_c - s_u)` DMD's gradient splits into
:math:`\nabla L_{DMD}(\text{cfg }\alpha) = \nabla L_{DM} + (\alpha-1)\nabla L_{CA}` (Liu et al. 2025);
:class:`CADMMethod` computes :math:`w_{CA} L_{CA} + w_{DM} L_{DM}` at an anchor with their own re-noise schedules
and the ``ca_norm`` normaliser (equations in :mod:`fewstep.methods.ddmd`). ``dm_at`` picks where DM acts: at the
same random anchor as CA (``every``) or at the final anchor of the fixed ``n_steps`` schedule (``final``, whose
x0-prediction is the student's n_steps sample, the distribution the fake score models under
``fake_samples="final"``); CA stays at the random anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.core.paths import cfg_combine
from fewstep.methods._shared.dm import Anchor, ca_loss, dm_loss, dm_terms, normaliser, renoise, renoise_time, teacher_x0
from fewstep.methods._shared.dm_base import DistributionMatchingMethod, DMConfig
from fewstep.methods.base import U_S, U_SELECT, Batch

__all__ = ["CA_NORMS", "DM_AT", "CADMConfig", "CADMMethod"]

CA_NORMS: tuple[str, ...] = ("separate", "dm", "cfg")
DM_AT: tuple[str, ...] = ("every", "final")


@dataclass
class CADMConfig(DMConfig):
    """Hyper-parameters of the CA + DM methods (decoupled DMD, CDM; see also :class:`DMConfig`).

    Attributes:
        guidance: CFG weight α; the CA term enters with weight (α − 1).
        ca_weight: Weight w_CA of the CA term.
        dm_weight: Weight w_DM of the DM term.
        ca_renoise: Re-noise schedule of the CA term: ``uniform_capped`` (U(0, σ)) or ``uniform``.
        dm_renoise: Re-noise schedule of the DM term: ``uniform`` or ``uniform_capped``.
        ca_norm: Normaliser of the CA term: ``separate`` (CDM code), ``dm`` or ``cfg`` (module docstring; default
            ``cfg``, measured in docs/results/dmd.md).
        fake_samples: ``final`` (default here, measured at w = 3: the fake score models the student's n_steps
            samples), ``anchor`` (DMD2/CDM code: the x0-predictions at the random anchors) or ``auto``
            (:meth:`CADMMethod.auto_fake_samples`: ``anchor`` when the CA term is off, i.e. α = 1 or w_CA = 0,
            else ``final``).
        n_steps: Steps of the student's fixed schedule (backward simulation).
        fake_updates: Fake-score steps per student step.
        dm_at: Where the DM (and CDM's off-trajectory) term acts: ``every`` (the random anchor shared with CA) or
            ``final`` (the last anchor of the fixed n_steps schedule, i.e. on the samples the fake score is
            fitted to under ``fake_samples="final"``; CA stays at the random anchor).
    """

    guidance: float = 3.0
    ca_weight: float = 1.0
    dm_weight: float = 1.0
    ca_renoise: str = "uniform_capped"
    dm_renoise: str = "uniform"
    ca_norm: str = "cfg"
    n_steps: int = 4
    fake_updates: int = 2
    fake_samples: str = "final"
    dm_at: str = "every"


class CADMMethod(DistributionMatchingMethod):
    """Base of decoupled DMD and CDM: w_CA·L_CA + w_DM·L_DM at a backward-simulated anchor."""

    parameterization = "velocity"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        for key in ("ca_renoise", "dm_renoise"):
            kind = getattr(self.config, key)
            if kind not in ("uniform", "uniform_capped"):
                raise ValueError(f"config key {key}={kind!r} is not a re-noise schedule; "
                                 "expected 'uniform' or 'uniform_capped'")
        if self.config.ca_norm not in CA_NORMS:
            raise ValueError(f"config key ca_norm={self.config.ca_norm!r} is not a CA normaliser; "
                             f"expected one of {CA_NORMS}")
        if self.config.dm_at not in DM_AT:
            raise ValueError(f"config key dm_at={self.config.dm_at!r} is not valid; expected one of {DM_AT}")
        if self.config.dm_at == "final" and self.config.ca_norm == "dm":
            raise ValueError("ca_norm='dm' shares the DM normaliser per sample, which needs DM at CA's anchor; "
                             "use dm_at='every' or another ca_norm")

    def auto_fake_samples(self) -> str:
        """``fake_samples="auto"``: ``anchor`` when CA is off (α = 1 or w_CA = 0), else ``final``.

        With CA off the loss is DM alone, at every anchor of the schedule (``dm_at="every"``): its gradient
        (x̂0^fake − x̂0^real)/n is the score difference of the distribution the fake score models, so that must be
        the anchors' x0-predictions; fitted to the final samples only, it stops pulling the early anchors once the
        final samples are right, and they drift (docs/results/dm_targets_mechanisms.md, "Why cdm and ddmd drift
        at w = 1").
        With CA on (α > 1), ``final`` is the measured choice (docs/results/dmd.md). Unconditional teachers
        come with α = 1 (``teacher.guidance=1``), so CA is off there too.
        """
        cfg = self.config
        ca_off = cfg.guidance == 1.0 or cfg.ca_weight == 0
        return "anchor" if ca_off and cfg.dm_at == "every" else "final"

    def dm_anchor(self, batch: Batch, a: Anchor) -> Anchor:
        """The anchor the DM terms act on: ``a`` (``dm_at="every"``) or the final anchor of the fixed schedule."""
        return a if self.config.dm_at == "every" else self.anchor(batch, grad=True, final=True)

    def dm_term(self, x0_student: Tensor, sigma: Tensor, u: Tensor, cond: Tensor | None,
                fake: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """L_DM of the student's x0-prediction with the conditional real teacher; returns (loss, g, n_DM).

        ``fake`` is the fake score to use (default ``self.fake_for(sigma)``, the copy routed by ``sigma``).
        """
        cfg = self.config
        fake = self.fake_for(sigma) if fake is None else fake
        tau = renoise_time(u, cfg.dm_renoise, sigma, cfg.t_min, cfg.t_max)
        x0_real, x0_fake = dm_terms(self.teacher, fake, x0_student, tau, cond, 1.0)
        loss, g = dm_loss(x0_student, x0_real, x0_fake, cfg.norm_floor, "dmd2")
        return loss, g, normaliser(x0_real, x0_student, cfg.norm_floor)

    def ca_term(self, x0_student: Tensor, sigma: Tensor, u: Tensor, cond: Tensor | None,
                n_dm: Tensor | None = None) -> Tensor:
        """L_CA with scale (α − 1) and the ``ca_norm`` normaliser; zero without labels or at α = 1."""
        cfg = self.config
        if cond is None or cfg.guidance == 1.0:
            return x0_student.sum() * 0.0
        tau = renoise_time(u, cfg.ca_renoise, sigma, cfg.t_min, cfg.t_max)
        x_tau = renoise(x0_student.detach(), tau, torch.randn_like(x0_student))
        x0_c = teacher_x0(self.teacher, x_tau, tau, cond)
        x0_u = teacher_x0(self.teacher, x_tau, tau, torch.full_like(cond, -1))
        norm = None
        if cfg.ca_norm == "dm":
            if n_dm is None:
                raise ValueError("ca_norm='dm' needs the DM normaliser n_dm")
            norm = n_dm
        elif cfg.ca_norm == "cfg":
            norm = normaliser(cfg_combine(x0_u, x0_c, cfg.guidance), x0_student, cfg.norm_floor)
        return ca_loss(x0_student, x0_c, x0_u, cfg.guidance - 1.0, cfg.norm_floor, norm)

    def ca_dm_loss(self, a: Anchor, batch: Batch, a_dm: Anchor | None = None) -> tuple[Tensor, dict[str, float]]:
        """w_CA·L_CA at anchor ``a`` + w_DM·L_DM at ``a_dm`` (default ``a``); terms with weight 0 are skipped."""
        cfg = self.config
        a_dm = a if a_dm is None else a_dm
        total = a.x0.sum() * 0.0
        logs: dict[str, float] = {}
        n_dm = None
        if cfg.dm_weight != 0 or cfg.ca_norm == "dm":
            dm, g, n_dm = self.dm_term(a_dm.x0, a_dm.sigma, batch.u[:, U_S], batch.cond)
            if cfg.dm_weight != 0:
                total = total + cfg.dm_weight * dm
                logs.update(dm_loss=float(dm.detach()), dm_grad_rms=float(g.pow(2).mean().sqrt()))
        if cfg.ca_weight != 0:
            ca = self.ca_term(a.x0, a.sigma, batch.u[:, U_SELECT], batch.cond, n_dm)
            total = total + cfg.ca_weight * ca
            logs["ca_loss"] = float(ca.detach())
        return total, logs
