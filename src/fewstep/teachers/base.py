r"""The teacher interface: velocity, score and x0-prediction at (x, t, optional class) with guidance.

A teacher is a velocity field :math:`v(x,t,c)` on a probability path. Class labels are a LongTensor of
shape (batch,) where ``-1`` means "no class"; ``cond=None`` means unconditional for the whole batch.
With a guidance weight w the teacher returns the classifier-free-guided field
:math:`v_u + w (v_c - v_u)` (w=1: conditional; rows with label -1 stay unconditional).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.paths import AffinePath, cfg_combine
from fewstep.core.utils import TimeLike, as_time, check_batch

__all__ = ["Teacher", "as_velocity_fn", "teacher_velocity"]


class Teacher(nn.Module, ABC):
    """Base class of all teachers. Subclasses implement :meth:`_velocity` for one conditioning.

    Attributes:
        path: The probability path the teacher lives on.
        event_shape: Shape of one sample.
        num_classes: Number of classes, or None for an unconditional teacher.
    """

    path: AffinePath
    event_shape: tuple[int, ...]
    num_classes: int | None = None

    @abstractmethod
    def _velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Velocity for labels ``cond`` (None or -1 rows: unconditional); t has shape (batch,)."""

    def _check(self, x: Tensor, t: TimeLike, cond: Tensor | None) -> Tensor:
        check_batch(x, self.event_shape)
        tt = as_time(t, x)
        if cond is not None:
            if self.num_classes is None:
                raise ValueError("this teacher is unconditional but class labels were given")
            if cond.shape != (x.shape[0],):
                raise ValueError(f"cond must have shape ({x.shape[0]},); got {tuple(cond.shape)}")
            if bool(((cond < -1) | (cond >= self.num_classes)).any()):
                raise ValueError(f"class labels must lie in [-1, {self.num_classes - 1}]")
        return tt

    def velocity(self, x: Tensor, t: TimeLike, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        r"""Guided velocity :math:`v_u + w(v_c - v_u)`; plain conditional velocity when w=1.

        Args:
            x: Points, shape (batch, *event_shape).
            t: Times in [0, 1], scalar or shape (batch,).
            cond: Optional class labels, shape (batch,), -1 for unconditional rows.
            guidance: Guidance weight w.

        Returns:
            The velocity, shape (batch, *event_shape).
        """
        tt = self._check(x, t, cond)
        if cond is None or guidance == 1.0:
            return self._velocity(x, tt, cond)
        v_c = self._velocity(x, tt, cond)
        v_u = self._velocity(x, tt, None)
        return cfg_combine(v_u, v_c, guidance)

    def forward(self, x: Tensor, t: TimeLike, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """Alias of :meth:`velocity`, so a teacher can be passed wherever a velocity field is expected."""
        return self.velocity(x, t, cond, guidance)

    def score(self, x: Tensor, t: TimeLike, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        r"""Score :math:`\nabla_x \log p_t(x)` converted from the velocity (exact, linear in v)."""
        return self.path.velocity_to_score(self.velocity(x, t, cond, guidance), x, t)

    def x0(self, x: Tensor, t: TimeLike, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        r"""Posterior mean :math:`\hat x_0 = E[x_0 | x_t = x]` converted from the velocity."""
        return self.path.velocity_to_x0(self.velocity(x, t, cond, guidance), x, t)

    def noise(self, x: Tensor, t: TimeLike, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        r"""Posterior mean of the noise :math:`\hat x_1 = E[x_1 | x_t = x]`."""
        return self.path.velocity_to_noise(self.velocity(x, t, cond, guidance), x, t)

    def prior_sample(self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """Noise x1 ~ N(0, I) of shape (n, *event_shape)."""
        return torch.randn((n, *self.event_shape), generator=generator, device=device, dtype=dtype)


def _takes_guidance(velocity: Callable[..., Tensor]) -> bool:
    """True when ``velocity`` has a parameter named ``guidance`` (a Teacher or a guided wrapper)."""
    try:
        return "guidance" in inspect.signature(velocity).parameters
    except (TypeError, ValueError):
        return False


def as_velocity_fn(teacher: Any, guidance: float = 1.0) -> Callable[..., Tensor]:
    r"""The velocity field ``v(x, t, cond=None)`` of any teacher-like object, with guidance weight w.

    The one dispatch for "a Teacher, or anything with ``.velocity``, or a plain callable":

    * an object whose ``velocity`` takes ``guidance`` (:class:`Teacher`, guided wrappers): the
      classifier-free-guided field :math:`v_u + w (v_c - v_u)` via ``velocity(x, t, cond=cond, guidance=w)``;
    * any other object with ``velocity(x, t, cond)`` (flow maps, previous reflow students, the exact
      teacher flow map): its instantaneous velocity; w must be 1;
    * a callable ``fn(x, t, cond=cond)``: called as is; w must be 1.

    Args:
        teacher: The teacher-like object.
        guidance: Guidance weight w (1: the plain conditional field).

    Returns:
        A callable ``v(x, t, cond=None) -> Tensor``.

    Raises:
        ValueError: when w != 1 and the object has no guided velocity, or it is neither a velocity
            provider nor callable.
    """
    velocity = getattr(teacher, "velocity", None)
    if isinstance(teacher, Teacher) or (callable(velocity) and _takes_guidance(velocity)):
        w = guidance
        return lambda x, t, cond=None: teacher.velocity(x, t, cond=cond, guidance=w)
    if guidance != 1.0:
        raise ValueError(f"guidance={guidance} needs a teacher with a guided velocity (a Teacher); "
                         f"{type(teacher).__name__} has none")
    if callable(velocity):
        return lambda x, t, cond=None: teacher.velocity(x, t, cond)
    if callable(teacher):
        return lambda x, t, cond=None: teacher(x, t, cond=cond)
    raise ValueError(f"{type(teacher).__name__} is not a teacher: it has no velocity(x, t, cond) and is not callable")


def teacher_velocity(teacher: Any, x: Tensor, t: TimeLike, cond: Tensor | None = None,
                     guidance: float = 1.0) -> Tensor:
    r"""One evaluation :math:`v(x, t, c; w)` of :func:`as_velocity_fn` (same dispatch, same errors)."""
    return as_velocity_fn(teacher, guidance)(x, t, cond)
