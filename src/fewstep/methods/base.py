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

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.core.utils import set_unregistered
from fewstep.sampling.spec import DETERMINISTIC, SamplerSpec
from fewstep.teachers.base import teacher_velocity

__all__ = ["Batch", "Method", "MethodConfig", "U_COLUMNS", "U_T", "U_S", "U_SELECT", "U_AUX", "U_CORNER", "U_ZERO",
           "U_FAKE", "U_LABEL_DROP", "U_FM_LABEL_DROP", "drop_labels"]

# ---- the columns of Batch.u (see the Batch docstring); each method keeps the columns it has always used
U_COLUMNS = 8
U_T = 0  #: first time draw t, or a grid / anchor index
U_S = 1  #: second time draw s (flow maps, IMM), or the DM re-noise level (DMD family)
U_SELECT = 2  #: the s = t choice, the pair / window / shortcut-level index, the CA or DMD2-GAN generator re-noise level
U_AUX = 3  #: t = t_max mass, SplitMeanFlow's split, IMM's s = 0, CDM's off-trajectory time, DMD2-GAN real re-noise
U_CORNER = 4  #: the (t_max, t_min) corner choice, CDM's off-trajectory or DMD2-GAN student re-noise level
U_ZERO = 5  #: the s = t_min choice, or DMD's regression-pair index
U_FAKE = 6  #: the fake score's re-noise level (DMD family)
U_LABEL_DROP = 7  #: label drop of the flow-map methods (MeanFlow, SplitMeanFlow, sCM, FACM, AYF)
U_FM_LABEL_DROP = U_S  #: label drop of flow_matching (column 1, kept for reproducibility)



def drop_labels(cond: Tensor | None, u: Tensor, p: float) -> Tensor | None:
    """Class labels with the rows where ``u < p`` replaced by the null label -1 (label dropout for classifier-free
    guidance); ``cond`` itself when it is None or ``p <= 0``.

    Args:
        cond: Class labels, shape (B,), or None.
        u: Uniforms of the rows, shape (B,) (a column of ``Batch.u``).
        p: Drop probability.

    Returns:
        The labels the networks see.
    """
    if cond is None or p <= 0:
        return cond
    return torch.where(u < p, torch.full_like(cond, -1), cond)

@dataclass
class Batch:
    """One training batch (already on the right device, this rank's shard).

    Attributes:
        x0: Data samples, shape (B, ...), or None for data-free methods.
        x1: Gaussian noise of the same shape as a sample, shape (B, ...).
        u: Uniform random numbers in [0, 1), shape (B, 8), for per-sample times and choices. Methods index it
            with the named columns of this module, never with bare numbers:

            ====  ==================  ============================================================================
            col   name                use
            ====  ==================  ============================================================================
            0     ``U_T``             t (every method), the consistency-grid / DM anchor index
            1     ``U_S``             s of (t, s) (flow maps, IMM), DM re-noise level; flow_matching's label
                                      drop (``U_FM_LABEL_DROP``)
            2     ``U_SELECT``        s = t choice, reflow pair / PeRFlow window / shortcut level, t = 1 groups
                                      (IMM), CA re-noise level
            3     ``U_AUX``           t = t_max rows (sCM, FACM), split point (SplitMeanFlow), s = 0 groups (IMM),
                                      off-trajectory time (CDM)
            4     ``U_CORNER``        (t_max, t_min) corner rows, CDM off-trajectory re-noise level
            5     ``U_ZERO``          s = t_min rows, DMD regression-pair index
            6     ``U_FAKE``          fake-score re-noise level (DMD family)
            7     ``U_LABEL_DROP``    label drop (flow-map methods)
            ====  ==================  ============================================================================
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
        needs_teacher: Whether a teacher is required whatever the config (False for training from data alone).
        needs_data: Whether batches must carry data x0 whatever the config.
        needs_init: The method whose trained student must initialise this one (``student.init_from``; the
            distribution-matching family: ``flow_matching``, as its papers start the generator from the teacher),
            or None; ``fewstep bench`` trains that init first.
        sampler: The default multi-step sampler (:class:`~fewstep.sampling.spec.SamplerSpec`): deterministic
            jumps on a uniform grid unless the method was trained for another (consistency students: gamma=1).

    Whether a run uses a teacher or data is decided in one place, :meth:`uses_teacher` / :meth:`uses_data` of
    the config (defaults: the two class attributes); methods whose needs depend on their config override those.

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
    needs_init: ClassVar[str | None] = None
    sampler: ClassVar[SamplerSpec] = DETERMINISTIC

    def __init__(self, student: FlowMap, teacher: nn.Module | None = None, config: Any = None) -> None:
        super().__init__()
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if type(self).needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")
        self.config = config
        self.student = student
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        # stored outside the module tree: the teacher is never trained, saved with the student, or cast
        set_unregistered(self, "teacher", teacher)

    def require_parameterization(self) -> None:
        """Refuse a student whose flow-map parameterization is not the one this method trains."""
        got = getattr(self.student, "parameterization", self.parameterization)
        if got != self.parameterization:
            raise ValueError(f"{self.name} trains a {self.parameterization!r} student; got {got!r}")

    def frozen_copy(self) -> nn.Module:
        """A frozen copy of the student: the target network that :func:`fewstep.core.ema.ema_update_` moves.

        Returns:
            A deep copy of the student with gradients disabled.
        """
        return copy.deepcopy(self.student).requires_grad_(False)

    def pair_classes(self) -> int | None:
        """How many class labels to draw for teacher pairs: the teacher's, when the student is conditional too.

        An unconditional student of a class-conditional teacher regresses onto the teacher's unconditional
        (label -1) trajectories: its network has no label input, so pairs with random labels would make its
        regression target for one noise the average of the endpoints of all classes (a blur between modes).

        Returns:
            The teacher's ``num_classes`` when both teacher and student have one, else None.
        """
        if not getattr(self.student.net, "num_classes", None):
            return None
        return getattr(self.teacher, "num_classes", None) or None

    @classmethod
    def uses_teacher(cls, config: Any) -> bool:
        """Whether a run of this method with ``config`` uses a teacher (built by the run builder)."""
        return cls.needs_teacher

    @classmethod
    def uses_data(cls, config: Any) -> bool:
        """Whether a run of this method with ``config`` needs data batches x0 (checked by the trainer)."""
        return cls.needs_data

    @classmethod
    def sampler_for(cls, config: Mapping[str, Any]) -> SamplerSpec:
        """The multi-step sampler a run with method config ``config`` (the run's ``method.cfg`` mapping, not yet
        validated: the run builder checks its keys) was trained for; default the class's ``sampler``."""
        return cls.sampler

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
        r"""The frozen teacher's velocity :math:`v_\phi(x, t, c; w)` (no gradient; :func:`teacher_velocity`)."""
        with torch.no_grad():
            return teacher_velocity(self.teacher, x, t, cond, guidance).to(x.dtype)

    @classmethod
    def make_config(cls, **overrides: Any) -> Any:
        """Build this method's config, rejecting unknown keys with a message that names them."""
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown config key(s) for method {cls.name!r}: {sorted(unknown)}; "
                             f"valid keys: {sorted(fields)}")
        return cls.config_class(**overrides)
