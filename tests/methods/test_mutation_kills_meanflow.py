r"""Tests added to kill mutants of methods/meanflow.py (tools/mutation.py): the loss and the guided velocity
against their equations on a probe network :math:`F(x,t,s,c) = a x + b t + d s + e\,c + k\,c\,t` whose JVP is
known by hand: :math:`dF/dt` along :math:`(v, 1, 0)` is :math:`a v + b + k c` (it depends on the label).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _probe_nets import LabelTimeProbe
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.base import U_LABEL_DROP
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
N = 24


_Probe = LabelTimeProbe  # F = a x + b t + d s + e c + k c t


def _teacher() -> GaussianMixtureTeacher:
    cov = torch.eye(2, dtype=torch.float64)[None].repeat(3, 1, 1) * 0.2
    return GaussianMixtureTeacher([0.3, 0.3, 0.4], [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], cov, classes=[0, 1, 2])


def _batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(x1=torch.randn(N, 2, generator=g, dtype=torch.float64),
                 u=torch.rand(N, 8, generator=g, dtype=torch.float64),
                 x0=torch.randn(N, 2, generator=g, dtype=torch.float64) + 1.0,
                 cond=torch.randint(0, 3, (N,), generator=g))


def _method(teacher: nn.Module | None = None, **cfg: object):
    cls = get_method("meanflow")
    net = _Probe()
    return cls(FlowMap(net, "average_velocity"), teacher, cls.make_config(**cfg)), net


@pytest.mark.parametrize("distill", [False, True])
def test_loss_is_the_meanflow_equation(distill: bool) -> None:
    r""":math:`\Delta = \|F(x_t,t,s,c) - [v - (t-s)(a v + b + k c)]\|^2`, :math:`L = E[\Delta/(\Delta+\epsilon)^p]`,
    labels dropped where u < cond_drop; logs loss, mse = E[Δ] and tangent_norm = E|(t-s)(a v + b + k c)|."""
    teacher = _teacher() if distill else None
    m, net = _method(teacher, norm_p=0.5, norm_eps=0.1, cond_drop=0.3, equal_fraction=0.25, time_sampler="uniform")
    b = _batch()
    t, s = m.sample_times(b)
    assert bool((t > s).any()) and bool((t == s).any())
    cond = torch.where(b.u[:, U_LABEL_DROP] < 0.3, torch.full_like(b.cond, -1), b.cond)
    assert bool((cond == -1).any()) and bool((cond >= 0).any())
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    v = teacher.velocity(x_t, t, cond) if distill else b.x1 - b.x0
    with torch.no_grad():
        tangent = (t - s)[:, None] * (net.a * v + net.b + net.k * cond.to(v.dtype)[:, None])
        target = v - tangent
    delta = ((net(x_t, t, s, cond) - target) ** 2).sum(1)
    expected = (delta / (delta.detach() + 0.1) ** 0.5).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert set(logs) == {"loss", "mse", "tangent_norm"}
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-9)
    assert logs["mse"] == pytest.approx(float(delta.mean()), rel=1e-9)
    assert logs["tangent_norm"] == pytest.approx(float(tangent.norm(dim=1).mean()), rel=1e-9)
    # the target is detached: the gradient flows through F(x_t, t, s, c) only
    (g,) = torch.autograd.grad(loss, net.e)
    (g_ref,) = torch.autograd.grad(expected, net.e)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(("omega", "kappa"), [(2.0, 0.5), (2.0, 0.0), (1.0, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_guided_velocity_from_data(omega: float, kappa: float) -> None:
    r""":math:`v_g = \omega\,dx + (1-\omega-\kappa)F(x,t,t,-1) + \kappa F(x,t,t,c)` on rows with t in the guided
    range and a real label (0 included); dx elsewhere."""
    m, net = _method(None, omega=omega, kappa=kappa, guidance_t_min=0.3, guidance_t_max=0.8)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dx = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.1, 0.4, 0.5, 0.7, 0.9, 0.5], dtype=torch.float64)
    cond = torch.tensor([0, 0, 1, 2, 1, -1])
    with torch.no_grad():
        want = omega * dx + (1 - omega - kappa) * net(x, t, t, torch.full_like(cond, -1)) + kappa * net(x, t, t, cond)
    inside = torch.tensor([False, True, True, True, False, False])
    got = m.guided_velocity(x, t, dx, cond)
    torch.testing.assert_close(got[inside], want[inside], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[~inside], dx[~inside], rtol=0, atol=0)
    assert not got.requires_grad  # the student's own guidance term is a target (no gradient)
    # unconditional batches train on plain x1 - x0
    torch.testing.assert_close(m.guided_velocity(x, t, dx, None), dx, rtol=0, atol=0)


def test_guided_velocity_when_distilling_is_the_conditional_teacher() -> None:
    """With a teacher the velocity is the teacher's, with the labels (omega, kappa are not used)."""
    teacher = _teacher()
    m, _ = _method(teacher, omega=2.0, kappa=0.5)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.1, 0.4, 0.5, 0.7, 0.9, 0.5], dtype=torch.float64)
    cond = torch.tensor([0, 0, 1, 2, 1, -1])
    got = m.guided_velocity(x, t, torch.zeros_like(x), cond)
    torch.testing.assert_close(got, teacher.velocity(x, t, cond), rtol=1e-12, atol=1e-12)
    assert float((got - teacher.velocity(x, t, None)).abs().max()) > 1e-2
