r"""The Method interface: how a student is trained. One file per method, one registry line each.

A method owns its student (a :class:`~fewstep.core.flowmap.FlowMap`), the frozen teacher and any auxiliary
networks (e.g. a fake-score network). The trainer owns optimisation mechanics (optimisers, LR schedules,
clipping, accumulation, mixed precision, EMA, gradient all-reduce across ranks) and, at every iteration,

1. asks :meth:`Method.schedule` which trainable networks to update at this step (e.g. DMD2 updates its
   fake score five times per student update),
2. for each name calls :meth:`Method.loss` on a fresh :class:`Batch`, back-propagates, and steps that
   network's optimiser,
3. calls :meth:`Method.after_update` (e.g. to move an EMA target network).

Randomness that must be reproducible across process counts comes with the batch (``x1`` noise and ``u``
uniforms, drawn for the global batch and then sharded); methods may draw more with torch's global RNG.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.sampling.spec import DETERMINISTIC, SamplerSpec

__all__ = ["Batch", "Method", "MethodConfig"]


@dataclass
class Batch:
    """One training batch (already on the right device, this rank's shard).

    Attributes:
        x0: Data samples, shape (B, ...), or None for data-free methods.
        x1: Gaussian noise of the same shape as a sample, shape (B, ...).
        u: Uniform random numbers in [0, 1), shape (B, 8), for per-sample times and choices.
        cond: Class labels, shape (B,), -1 meaning unconditional, or None.
    """

    x1: Tensor
    u: Tensor
    x0: Tensor | None = None
    cond: Tensor | None = None

    @property
    def size(self) -> int:
        return self.x1.shape[0]


@dataclass
class MethodConfig:
    """Base class of method hyper-parameters. Subclass it as a dataclass with typed, documented fields."""


class Method(nn.Module):
    """Base class of all training methods.

    Class attributes:
        name: Registry name (used by the CLI and configs).
        description: One line shown by ``fewstep methods``.
        config_class: The dataclass of this method's hyper-parameters.
        parameterization: The flow-map parameterization of the student this method trains.
        needs_teacher: Whether a teacher is required (False for training from data alone).
        needs_data: Whether batches must carry data x0.
        sampler: The default multi-step sampler (:class:`~fewstep.sampling.spec.SamplerSpec`): deterministic
            jumps on a uniform grid unless the method was trained for another (consistency students: gamma=1).

    Args:
        student: The flow-map student to train.
        teacher: The frozen teacher (any velocity field with ``velocity(x, t, cond, guidance)``), or None.
        config: This method's config (an instance of ``config_class``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    parameterization: ClassVar[str] = "average_velocity"
    needs_teacher: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    sampler: ClassVar[SamplerSpec] = DETERMINISTIC

    def __init__(self, student: FlowMap, teacher: nn.Module | None = None, config: Any = None) -> None:
        super().__init__()
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")
        self.config = config
        self.student = student
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        # stored outside the module tree: the teacher is never trained, saved with the student, or cast
        self.__dict__["teacher"] = teacher

    # ------------------------------------------------------------------ what the trainer calls
    def trainable(self) -> dict[str, nn.Module]:
        """The networks to optimise, by name; each gets its own optimiser. Must include "student"."""
        return {"student": self.student}

    def schedule(self, step: int) -> list[str]:
        """Names of the networks to update at this step, in order (default: the student every step)."""
        return ["student"]

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss for network ``name`` on ``batch`` and a dict of floats to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def after_update(self, name: str, step: int) -> None:
        """Hook called after network ``name`` was stepped (e.g. update an EMA target network)."""

    def prepare(self, context: dict[str, Any]) -> None:
        """Hook called once before training (e.g. generate reflow pairs). ``context`` holds run info."""

    # ------------------------------------------------------------------ helpers for subclasses
    def velocity_target(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """The frozen teacher's velocity (no gradient)."""
        with torch.no_grad():
            if hasattr(self.teacher, "velocity"):
                return self.teacher.velocity(x, t, cond=cond, guidance=guidance).to(x.dtype)
            return self.teacher(x, t, cond=cond).to(x.dtype)

    @classmethod
    def make_config(cls, **overrides: Any) -> Any:
        """Build this method's config, rejecting unknown keys with a message that names them."""
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown config key(s) for method {cls.name!r}: {sorted(unknown)}; "
                             f"valid keys: {sorted(fields)}")
        return cls.config_class(**overrides)
