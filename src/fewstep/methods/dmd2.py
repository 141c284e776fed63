r"""DMD2 (Yin et al. 2024b): distribution matching with a two-time-scale fake score and backward simulation.

The generator loss is the guided DM loss of :mod:`fewstep.methods.dmd` without regression,
:math:`L = \tfrac12\|\hat x_0^S - sg(\hat x_0^S - g)\|^2`, with ``fake_updates`` fake-score steps per student step;
multi-step students use backward simulation on their inference schedule.

Optional GAN head (``gan_weight > 0``; off by default, as in the paper's ablation "without GAN"): a classifier on the
fake score's bottleneck features (:mod:`fewstep.methods._shared.gan`), trained with the fake score on real data
against the student's samples (weight ``gan_disc_weight``), and a non-saturating generator term
:math:`\lambda_G\,\mathrm{softplus}(-D(x^S_\tau))` added to the student loss. It needs real data batches, which
follow the unguided data distribution: with a guided teacher (w > 1) the DM term pulls toward the guided target and
the GAN term toward the data (measured only at w = 1, docs/results/images_dmd2_gan.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods._shared.dm import Anchor, renoise_time
from fewstep.methods._shared.dm_base import DistributionMatchingMethod, DMConfig
from fewstep.methods._shared.gan import GANHead, discriminator_loss, generator_loss
from fewstep.methods.base import U_AUX, U_CORNER, U_SELECT, Batch
from fewstep.methods.registry import register

__all__ = ["DMD2", "DMD2Config"]


@dataclass
class DMD2Config(DMConfig):
    """Hyper-parameters of DMD2 (see :class:`DMConfig`; defaults: 5 fake updates, τ ~ U[0.02, 0.98]).

    Attributes:
        gan_weight: Weight λ_G of the generator's GAN term; 0 (default) = no GAN head. DMD2 uses small weights
            (order 1e-3 to 1e-2) next to the DM term.
        gan_disc_weight: Weight of the discriminator loss added to the fake score's flow-matching loss.
    """

    gan_weight: float = 0.0
    gan_disc_weight: float = 1.0e-2


@register
class DMD2(DistributionMatchingMethod):
    """DMD2: DM loss with a two-time-scale fake score and backward simulation (optional GAN head)."""

    name = "dmd2"
    description = ("DMD2: distribution matching with a two-time-scale fake score, backward simulation, "
                   "no regression, optional GAN head on the fake score.")
    config_class = DMD2Config
    parameterization = "consistency"

    def __init__(self, student: FlowMap, teacher: nn.Module | None = None, config: Any = None,
                 fake: nn.Module | None = None) -> None:
        super().__init__(student, teacher, config, fake)
        cfg = self.config
        if cfg.gan_weight < 0 or cfg.gan_disc_weight < 0:
            raise ValueError(f"gan_weight and gan_disc_weight must be >= 0; got {cfg.gan_weight}, "
                             f"{cfg.gan_disc_weight}")
        self.gan_head: GANHead | None = None
        if cfg.gan_weight > 0:
            if not isinstance(self.fake, FlowMap):
                raise ValueError("the GAN head reads one fake score's features; fake_split > 1 keeps several: "
                                 "use fake_split = 1 with gan_weight > 0")
            self.gan_head = GANHead(self.fake)

    @classmethod
    def uses_data(cls, config: Any) -> bool:
        """Real data batches are needed only by the GAN head's discriminator."""
        return config.gan_weight > 0

    def trainable(self) -> dict[str, nn.Module]:
        """The student, and the fake score (with the GAN head when on: one optimiser trains both)."""
        if self.gan_head is None:
            return super().trainable()
        return {"student": self.student, "fake": nn.ModuleList([self.fake, self.gan_head])}

    def fake_loss(self, batch: Batch, anchor: Anchor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The fake score's flow matching, plus ``gan_disc_weight`` times the discriminator loss (GAN on); the
        discriminator's student samples are the fake score's own (``anchor``, default :meth:`fake_anchor`)."""
        a = self.fake_anchor(batch) if anchor is None else anchor
        loss, logs = super().fake_loss(batch, a)
        if self.gan_head is None:
            return loss, logs
        if batch.x0 is None:
            raise ValueError("dmd2 with gan_weight > 0 needs real data batches x0 (data.name: a dataset or teacher)")
        cfg = self.config
        tau_r = renoise_time(batch.u[:, U_AUX], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
        tau_s = renoise_time(batch.u[:, U_CORNER], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
        d, d_logs = discriminator_loss(self.fake, self.gan_head, batch.x0.to(a.x0.dtype), a.x0, tau_r, tau_s,
                                       batch.cond)
        logs.update(d_logs)
        return loss + cfg.gan_disc_weight * d, logs

    def student_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        a = self.anchor(batch, grad=True)
        loss, logs = self.dm_student_loss(batch, a)
        if self.gan_head is not None:
            cfg = self.config
            tau = renoise_time(batch.u[:, U_SELECT], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
            g = generator_loss(self.fake, self.gan_head, a.x0, tau, batch.cond)
            logs["gan_g"] = float(g.detach())
            loss = loss + cfg.gan_weight * g
        logs["loss"] = float(loss.detach())
        return loss, logs
