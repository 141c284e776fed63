"""A teacher with a default classifier-free guidance weight, for methods that have no ``guidance`` field.

:func:`fewstep.config.build.build_teacher` wraps a conditional teacher in :class:`GuidedTeacher` when the run config
asks for w != 1 and the method cannot take w itself.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["GuidedTeacher"]


class GuidedTeacher(nn.Module):
    """A teacher whose default guidance weight is ``w``: velocity(x, t, cond) = v_u + w (v_c - v_u)."""

    def __init__(self, teacher: nn.Module, guidance: float) -> None:
        super().__init__()
        self.inner, self.guidance = teacher, float(guidance)
        for attr in ("path", "event_shape", "num_classes"):
            if hasattr(teacher, attr):
                setattr(self, attr, getattr(teacher, attr))

    def velocity(self, x: Tensor, t: Any, cond: Tensor | None = None, guidance: float | None = None) -> Tensor:
        """Guided velocity with weight ``guidance`` if given and != 1, else the configured w."""
        w = self.guidance if guidance is None or guidance == 1.0 else guidance
        return self.inner.velocity(x, t, cond=cond, guidance=w)

    def forward(self, x: Tensor, t: Any, cond: Tensor | None = None, guidance: float | None = None) -> Tensor:
        return self.velocity(x, t, cond, guidance)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)
