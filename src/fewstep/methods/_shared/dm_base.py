r"""The base of the distribution-matching family (DMD, DMD2, decoupled DMD, CDM): the online fake score, its
update ratio and flow-matching loss, the optional EMA merge of the student into it, backward simulation to a
per-sample anchor (column ``U_T`` of ``batch.u``) and the guided DM generator loss of DMD / DMD2
(the loss terms themselves are in :mod:`fewstep.methods._shared.dm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.ema import ema_update_
from fewstep.core.flowmap import FlowMap
from fewstep.methods._shared.dm import (
    Anchor,
    anchor_index,
    backward_simulate,
    dm_loss,
    dm_terms,
    fake_score_loss,
    fixed_schedule,
    make_fake_score,
    renoise_time,
)
from fewstep.methods._shared.split_fake import SplitFake
from fewstep.methods.base import U_FAKE, U_S, U_T, Batch, Method, MethodConfig
from fewstep.sampling.spec import SamplerSpec

__all__ = ["DMConfig", "DistributionMatchingMethod", "FAKE_SAMPLES"]


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
            backward-simulation anchor as the student loss, as in DMD2/CDM), ``final`` (the student's output
            after the fixed ``n_steps`` inference schedule, i.e. its sampling distribution) or ``auto`` (the
            method's rule, :meth:`DistributionMatchingMethod.auto_fake_samples`; ``anchor`` here).
        fake_split: Copies of the fake score, one per anchor-level bin (:mod:`~fewstep.methods._shared.split_fake`):
            1 (default) = one fake score for every anchor; K > 1 fits copy k to the predictions from bin k only
            when ``fake_samples`` resolves to ``anchor`` (under ``final`` the fake models one distribution, the
            n_steps samples, so one copy is kept); needs ``fake_ema = 0``.
        fresh_noise: Backward simulation re-noises every step with fresh noise (DMD2's code; gamma = 1) instead of
            the student's deterministic jumps (gamma = 0); the run's default sampler follows (gamma = 1,
            :meth:`DistributionMatchingMethod.sampler_for`).
    """

    guidance: float = 1.0
    n_steps: int = 1
    fake_updates: int = 5
    norm_floor: float = 0.1
    t_min: float = 0.02
    t_max: float = 0.98
    fake_ema: float = 0.0
    fake_samples: str = "anchor"
    fake_split: int = 1
    fresh_noise: bool = False


FAKE_SAMPLES: tuple[str, ...] = ("anchor", "final", "auto")


class DistributionMatchingMethod(Method):
    """Base of DMD-family methods: owns the fake score, its FM loss, the update ratio and backward simulation.

    Args:
        student: The flow-map student.
        teacher: The frozen real teacher (``velocity(x, t, cond, guidance)``).
        config: A :class:`DMConfig` subclass instance.
        fake: Optional fake-score velocity network; default a copy of the student's backbone.
    """

    config_class = DMConfig
    needs_init = "flow_matching"  # DM from random weights collapses (docs/results/dm_targets.md)

    @classmethod
    def sampler_for(cls, config: Mapping[str, Any]) -> SamplerSpec:
        """Fresh-noise backward simulation (``fresh_noise``) trains the gamma = 1 chain: sample with gamma = 1."""
        return SamplerSpec(gamma=1.0, grid=cls.sampler.grid) if config.get("fresh_noise") is True else cls.sampler

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
            raise ValueError(f"config key fake_samples={cfg.fake_samples!r} is not valid; "
                             f"expected one of {FAKE_SAMPLES}")
        self.fake = fake if fake is not None else make_fake_score(student)
        if cfg.fake_split < 1:
            raise ValueError(f"fake_split must be >= 1; got {cfg.fake_split}")
        if cfg.fake_split > 1 and cfg.fake_ema > 0:
            raise ValueError("fake_split > 1 fits each copy to its own anchor bin; a fake_ema merge of the student "
                             "into every copy is not defined: use fake_ema = 0")
        if cfg.fake_split > 1 and self.fake_samples == "anchor":  # ``final``: one distribution, one fake score
            self.fake = SplitFake(self.fake, cfg.fake_split)

    def fake_for(self, sigma: Tensor) -> Any:
        """The fake score for predictions made from anchor levels ``sigma``: the fake itself, or its routed split."""
        return self.fake.route(sigma) if isinstance(self.fake, SplitFake) else self.fake

    def auto_fake_samples(self) -> str:
        """What ``fake_samples="auto"`` resolves to: ``anchor`` (the fake score models what DM acts on)."""
        return "anchor"

    @property
    def fake_samples(self) -> str:
        """The resolved ``fake_samples`` (``anchor`` or ``final``; ``auto`` becomes :meth:`auto_fake_samples`)."""
        kind = self.config.fake_samples
        return self.auto_fake_samples() if kind == "auto" else kind

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake": self.fake}

    def schedule(self, step: int) -> list[str]:
        """``fake_updates`` fake-score steps, then one student step."""
        return ["fake"] * self.config.fake_updates + ["student"]

    def after_update(self, name: str, step: int) -> None:
        if name == "fake" and self.config.fake_ema > 0:
            ema_update_(self.fake, self.student, self.config.fake_ema)

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
            idx = anchor_index(batch.u[:, U_T], sched.numel() - 1)
        return backward_simulate(self.student, batch.x1, sched, idx, batch.cond, grad=grad,
                                 fresh=self.config.fresh_noise)

    def fake_anchor(self, batch: Batch) -> Anchor:
        """The student's x0-predictions the fake score is fitted to (``fake_samples``), without gradient."""
        return self.anchor(batch, grad=False, final=self.fake_samples == "final")

    def fake_loss(self, batch: Batch, anchor: Anchor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Flow matching of the fake score on the student's x0-predictions (``fake_samples``), τ ~ U[t_min, t_max];
        ``anchor`` (default :meth:`fake_anchor`) lets a subclass reuse the predictions."""
        a = self.fake_anchor(batch) if anchor is None else anchor
        tau = renoise_time(batch.u[:, U_FAKE], "uniform", t_min=self.config.t_min, t_max=self.config.t_max)
        loss = fake_score_loss(self.fake_for(a.sigma), a.x0, tau, torch.randn_like(a.x0), batch.cond)
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

    def dm_student_loss(self, batch: Batch, anchor: Anchor | None = None) -> tuple[Tensor, dict[str, float]]:
        """L_DM at a backward-simulated anchor (default a fresh one, with gradient) with the real teacher guided by
        ``config.guidance``."""
        cfg = self.config
        a = self.anchor(batch, grad=True) if anchor is None else anchor
        tau = renoise_time(batch.u[:, U_S], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
        x0_real, x0_fake = dm_terms(self.teacher, self.fake_for(a.sigma), a.x0, tau, batch.cond, cfg.guidance)
        loss, g = dm_loss(a.x0, x0_real, x0_fake, cfg.norm_floor, "dmd2")
        return loss, {"dm_loss": float(loss.detach()), "dm_grad_rms": float(g.pow(2).mean().sqrt())}
