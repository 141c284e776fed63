"""The one teacher dispatch: Teacher / guided wrapper / object with .velocity / plain callable."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.flowmap import VelocityFlowMap
from fewstep.teachers.base import as_velocity_fn, teacher_velocity
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


class _Guided(nn.Module):
    """A non-Teacher wrapper whose velocity takes ``guidance`` (like config.build.GuidedTeacher)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        return self.inner.velocity(x, t, cond=cond, guidance=guidance)


def _data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(6, generator=g, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3, -1, 0])
    return x, t, cond


def test_teacher_gets_guided_velocity() -> None:
    teacher = load_preset("ring8", conditional=True)
    x, t, cond = _data()
    want = teacher.velocity(x, t, cond=cond, guidance=2.5)
    assert torch.equal(as_velocity_fn(teacher, 2.5)(x, t, cond), want)
    assert torch.equal(teacher_velocity(teacher, x, t, cond, guidance=2.5), want)
    assert torch.equal(as_velocity_fn(_Guided(teacher), 2.5)(x, t, cond), want)
    assert not torch.equal(as_velocity_fn(teacher)(x, t, cond), want)


def test_velocity_object_and_callable() -> None:
    teacher = load_preset("ring8")
    x, t, _ = _data()
    want = teacher.velocity(x, t)
    flow = VelocityFlowMap(lambda z, s, c: teacher.velocity(z, s, c))
    assert torch.equal(as_velocity_fn(flow)(x, t), want)
    assert torch.equal(as_velocity_fn(lambda z, s, cond=None: teacher.velocity(z, s, cond))(x, t), want)


def test_guidance_without_guided_velocity_is_one_clear_error() -> None:
    flow = VelocityFlowMap(lambda z, s, c: z)
    with pytest.raises(ValueError, match="guided velocity"):
        as_velocity_fn(flow, guidance=2.0)
    with pytest.raises(ValueError, match="not a teacher"):
        as_velocity_fn(object())
