r"""Tests added to kill mutants of methods/_shared/flowmap_base.py (tools/mutation.py): the configs' defaults and
refusals (full messages, boundaries), the teacher switch, :math:`x_t = (1-t)x_0 + t x_1`, the label drop, the
guided t-range, the velocity (data, teacher, teacher with CFG on the range only), the student's F and JVP with the
configured mode and step, and the average-velocity draw of (t, s, x_t, x1 - x0, labels).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import LinearProbe, random_batch, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.core.jvp import jvp
from fewstep.methods import Batch
from fewstep.methods._shared.flowmap_base import (
    AverageVelocityConfig,
    AverageVelocityMethod,
    FlowMapTrainConfig,
    FlowMapTrainMethod,
)
from fewstep.methods._shared.flowmap_helpers import sample_t_s
from fewstep.teachers.base import teacher_velocity

torch.set_num_threads(1)
N = 16


class _Quad(LinearProbe):
    """F(x, t, s, c) = a x^3 + b t^2 + d s^3 + e c (non-linear, so finite differences depend on their step).

    The scalars a, b, d, e are :class:`LinearProbe`'s (0.3, -0.7, 0.4, 0.5).
    """

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x ** 3 + (self.b * t ** 2 + self.d * s ** 3 + self.e * lab)[:, None]


class _FM(FlowMapTrainMethod):
    name = "probe_fm"


class _AV(AverageVelocityMethod):
    name = "probe_av"


def test_config_defaults() -> None:
    want = dict(time_sampler="logit_normal", logit_mean=-0.4, logit_std=1.0, t_min=0.0, t_max=1.0, jvp_mode="func",
                jvp_eps=1e-3, use_teacher=True, guidance=1.0, guidance_t_min=0.0, guidance_t_max=1.0, cond_drop=0.1)
    got = {f.name: getattr(FlowMapTrainConfig(), f.name) for f in dataclasses.fields(FlowMapTrainConfig)}
    assert {k: got[k] for k in want} == want
    av = AverageVelocityConfig()
    assert (av.equal_fraction, av.corner_fraction, av.zero_fraction, av.norm_p, av.norm_eps) == (0.5, 0.0, 0.0,
                                                                                                  0.0, 1e-2)
    assert av.logit_mean == -0.4 and av.cond_drop == 0.1


@pytest.mark.parametrize(("kw", "msg"), [
    (dict(time_sampler="beta"), "time_sampler must be one of ('uniform', 'logit_normal'); got 'beta'"),
    (dict(jvp_mode="nope"), "jvp_mode must be one of "),
    (dict(t_min=-0.1), "need 0 <= t_min < t_max <= 1; got t_min=-0.1, t_max=1.0"),
    (dict(t_min=0.5, t_max=0.5), "need 0 <= t_min < t_max <= 1; got t_min=0.5, t_max=0.5"),
    (dict(t_max=1.1), "need 0 <= t_min < t_max <= 1; got t_min=0.0, t_max=1.1"),
    (dict(cond_drop=-0.1), "cond_drop must lie in [0, 1]; got -0.1"),
    (dict(cond_drop=1.1), "cond_drop must lie in [0, 1]; got 1.1"),
    (dict(logit_std=0.0), "logit_std must be positive; got 0.0"),
    (dict(equal_fraction=-0.1), "equal_fraction must lie in [0, 1]; got -0.1"),
    (dict(equal_fraction=1.1), "equal_fraction must lie in [0, 1]; got 1.1"),
    (dict(corner_fraction=-0.1), "corner_fraction must lie in [0, 1]; got -0.1"),
    (dict(corner_fraction=1.1), "corner_fraction must lie in [0, 1]; got 1.1"),
    (dict(zero_fraction=-0.1), "zero_fraction must lie in [0, 1]; got -0.1"),
    (dict(zero_fraction=1.1), "zero_fraction must lie in [0, 1]; got 1.1"),
    (dict(norm_p=-0.5), "need norm_p >= 0 and norm_eps > 0; got -0.5, 0.01"),
    (dict(norm_eps=0.0), "need norm_p >= 0 and norm_eps > 0; got 0.0, 0.0"),
])
def test_config_refusals(kw: dict, msg: str) -> None:
    from fewstep.core.jvp import JVP_MODES
    from fewstep.core.timesteps import TIME_SAMPLERS
    msg = msg.replace("('uniform', 'logit_normal')", str(TIME_SAMPLERS))
    if kw.get("jvp_mode") == "nope":
        msg = f"jvp_mode must be one of {JVP_MODES}; got 'nope'"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        AverageVelocityConfig(**kw)


def test_config_boundaries_accepted() -> None:
    for kw in (dict(t_min=0.0, t_max=1.0), dict(cond_drop=0.0), dict(cond_drop=1.0), dict(logit_std=1e-9),
               dict(equal_fraction=0.0), dict(equal_fraction=1.0), dict(corner_fraction=1.0),
               dict(zero_fraction=1.0), dict(norm_p=0.0, norm_eps=1e-9), dict(time_sampler="uniform"),
               dict(jvp_mode="fd"), dict(jvp_mode="autograd")):
        AverageVelocityConfig(**kw)
    FlowMapTrainConfig(t_min=0.2, t_max=0.3)


def _fm(cls: type = _FM, teacher: nn.Module | None = None, **cfg: object) -> FlowMapTrainMethod:
    param = "average_velocity" if issubclass(cls, AverageVelocityMethod) else "consistency"
    return cls(FlowMap(_Quad(), param), teacher, cls.config_class(**cfg))


def test_teacher_switch() -> None:
    teacher = two_class_teacher()
    assert _fm(teacher=teacher).distilling is True
    assert _fm(teacher=teacher, use_teacher=False).distilling is False
    assert _fm().distilling is False
    assert _FM.uses_teacher(FlowMapTrainConfig()) is True
    assert _FM.uses_teacher(FlowMapTrainConfig(use_teacher=False)) is False
    needs = type("_Needs", (FlowMapTrainMethod,), {"name": "needs", "needs_teacher": True})
    assert needs.uses_teacher(FlowMapTrainConfig(use_teacher=False)) is True


def test_noisy_input_and_label_drop() -> None:
    m = _fm(cond_drop=0.3)
    b = random_batch(N, 3)
    t = b.u[:, 6]
    x_t, dx = m.noisy_input(b, t)
    torch.testing.assert_close(x_t, (1 - t)[:, None] * b.x0 + t[:, None] * b.x1, rtol=0, atol=1e-14)
    torch.testing.assert_close(dx, b.x1 - b.x0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^" + re.escape("method 'probe_fm' needs data batches (x0) to build "
                                                         "x_t = (1-t) x0 + t x1") + "$"):
        m.noisy_input(Batch(x1=b.x1, u=b.u), t)
    u = b.u.clone()
    u[0, 7], u[1, 7] = 0.3, 0.29
    cond = m.drop_labels(Batch(x1=b.x1, u=u, x0=b.x0, cond=b.cond))
    assert cond.dtype == b.cond.dtype
    torch.testing.assert_close(cond, torch.where(u[:, 7] < 0.3, torch.full_like(b.cond, -1), b.cond))
    assert int(cond[0]) == int(b.cond[0]) and int(cond[1]) == -1
    assert m.drop_labels(Batch(x1=b.x1, u=u, x0=b.x0)) is None
    assert torch.equal(_fm(cond_drop=0.0).drop_labels(b), b.cond)
    assert bool((_fm(cond_drop=1.0).drop_labels(b) == -1).all())


def test_guidance_range_and_velocity() -> None:
    teacher = two_class_teacher()
    m = _fm(teacher=teacher, guidance=2.5, guidance_t_min=0.3, guidance_t_max=0.6)
    t = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.61, 0.9] * 2, dtype=torch.float64)
    assert m.in_guidance_range(t).tolist() == [False, True, True, True, False, False] * 2
    b = random_batch(12, 4)
    x_t, dx = m.noisy_input(b, t)
    v = m.velocity(x_t, t, dx, b.cond)
    v1 = teacher_velocity(teacher, x_t, t, b.cond)
    vg = teacher_velocity(teacher, x_t, t, b.cond, 2.5)
    assert not torch.allclose(v1, vg)
    want = torch.where(m.in_guidance_range(t)[:, None], vg, v1)
    torch.testing.assert_close(v, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.velocity(x_t, t, dx, None), teacher_velocity(teacher, x_t, t, None),
                               rtol=1e-12, atol=1e-12)
    m1 = _fm(teacher=teacher, guidance_t_min=0.3, guidance_t_max=0.6)
    torch.testing.assert_close(m1.velocity(x_t, t, dx, b.cond), v1, rtol=1e-12, atol=1e-12)
    assert _fm(guidance=2.5).velocity(x_t, t, dx, b.cond) is dx
    assert _fm(teacher=teacher, use_teacher=False, guidance=2.5).velocity(x_t, t, dx, b.cond) is dx


@pytest.mark.parametrize("cls", [_FM, _AV])
def test_student_fn_and_jvp(cls: type) -> None:
    m = _fm(cls, jvp_mode="fd", jvp_eps=0.05)
    b = random_batch(N, 5)
    t, s = b.u[:, 6], b.u[:, 7] * b.u[:, 6]
    net = m.student.net
    s_net = s if cls is _AV else torch.zeros_like(t)
    f_want = net(b.x1, t, s_net, b.cond)
    torch.testing.assert_close(m.student_fn(b.cond)(b.x1, t, s), f_want, rtol=0, atol=0)
    tang = (b.x0, torch.ones_like(t), 0.5 * torch.ones_like(s))
    f, df = m.student_jvp(b.x1, t, s, tang, b.cond)
    f_ref, df_ref = jvp(m.student_fn(b.cond), (b.x1, t, s), tang, mode="fd", eps=0.05)
    torch.testing.assert_close(f, f_want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(df, df_ref, rtol=1e-12, atol=1e-12)
    _, df_small = jvp(m.student_fn(b.cond), (b.x1, t, s), tang, mode="fd", eps=1e-3)
    assert not torch.allclose(df, df_small, rtol=1e-6, atol=1e-9)  # the step matters here
    # exact JVP of the default mode ("func"): 3 a x^2 dx + 2 b t + 3 d s'^2 ds'
    mf = _fm(cls)
    _, dfe = mf.student_jvp(b.x1, t, s, tang, b.cond)
    n = mf.student.net
    ds = 0.5 if cls is _AV else 0.0
    want = 3 * n.a * b.x1 ** 2 * b.x0 + (2 * n.b * t + 3 * n.d * s_net ** 2 * ds)[:, None]
    torch.testing.assert_close(dfe, want.detach(), rtol=1e-12, atol=1e-12)


def test_average_velocity_draw() -> None:
    cfg = dict(time_sampler="logit_normal", logit_mean=0.3, logit_std=1.3, equal_fraction=0.3, t_min=0.05,
               t_max=0.9, corner_fraction=0.2, zero_fraction=0.25, cond_drop=0.4)
    m = _fm(_AV, **cfg)
    b = random_batch(64, 6)
    t_ref, s_ref = sample_t_s(b.u, "logit_normal", 0.3, 1.3, 0.3, 0.05, 0.9, 0.2, 0.25)
    t, s = m.sample_times(b)
    torch.testing.assert_close(t, t_ref, rtol=0, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert bool((s == 0.05).any()) and bool((t == 0.9).any()) and bool((s == t).any())
    t2, s2, x_t, dx, cond = m.draw(b)
    torch.testing.assert_close(t2, t_ref, rtol=0, atol=0)
    torch.testing.assert_close(s2, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(x_t, (1 - t_ref)[:, None] * b.x0 + t_ref[:, None] * b.x1, rtol=0, atol=1e-14)
    torch.testing.assert_close(dx, b.x1 - b.x0, rtol=0, atol=0)
    torch.testing.assert_close(cond, torch.where(b.u[:, 7] < 0.4, torch.full_like(b.cond, -1), b.cond))
    assert bool((cond == -1).any())


class _Recorder(nn.Module):
    """v(x, t, c; w) = x + w (the guided field differs from the plain one even without labels); records w."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[float] = []

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        self.calls.append(guidance)
        return x + guidance


def test_velocity_guides_only_labelled_rows_with_w_not_one() -> None:
    teacher = _Recorder()
    b = random_batch(4, 7)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    for w in (2.0, 3.0):
        teacher.calls.clear()
        v = _fm(teacher=teacher, guidance=w, guidance_t_min=0.3, guidance_t_max=0.7).velocity(b.x1, t, b.x0, b.cond)
        assert teacher.calls == [1.0, w]
        want = b.x1 + torch.tensor([1.0, w, w, 1.0], dtype=torch.float64)[:, None]
        torch.testing.assert_close(v, want, rtol=0, atol=0)
        teacher.calls.clear()  # no labels: the plain field only, one call
        v = _fm(teacher=teacher, guidance=w).velocity(b.x1, t, b.x0, None)
        assert teacher.calls == [1.0]
        torch.testing.assert_close(v, b.x1 + 1.0, rtol=0, atol=0)
