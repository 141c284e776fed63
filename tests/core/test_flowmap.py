"""Tests of flow maps: boundary condition, velocity, the exact teacher flow map and the average velocity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fewstep.core.flowmap import PARAMETERIZATIONS, FlowMap, VelocityFlowMap
from fewstep.networks.mlp import MLP
from fewstep.sampling.samplers import solve_adaptive
from fewstep.teachers import TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)

SHAPES = [(2,), (3,), (1, 2, 2)]


@settings(max_examples=30, deadline=None)
@given(param=st.sampled_from(PARAMETERIZATIONS), shape=st.sampled_from(SHAPES), batch=st.integers(1, 5),
       t=st.floats(0.0, 1.0), conditional=st.booleans(), seed=st.integers(0, 1000))
def test_identity_at_equal_times(param: str, shape: tuple[int, ...], batch: int, t: float, conditional: bool,
                                 seed: int) -> None:
    """f_{t->t}(x) = x exactly (bitwise) for every parameterization and any network."""
    torch.manual_seed(seed)
    dim = int(np.prod(shape))
    net = MLP(dim, hidden=8, depth=2, emb_dim=8, num_classes=3 if conditional else None, event_shape=shape)
    f = FlowMap(net, param)
    x = torch.randn(batch, *shape)
    cond = torch.randint(-1, 3, (batch,)) if conditional else None
    tt = torch.full((batch,), t)
    assert torch.equal(f(x, tt, tt, cond), x)
    assert torch.equal(f(x, t, t, cond), x)
    y = f(x, tt, tt * 0.5, cond)
    assert y.shape == x.shape and (t < 1e-3 or float((y - x).detach().abs().max()) > 0)


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_velocity_is_derivative_of_flowmap(param: str) -> None:
    r"""The velocity is the derivative of the jump at s = t (second-order one-sided differences, float64):

    :math:`\partial_s f_{t\to s}(x)|_{s=t} = v(x,t)` and :math:`\partial_t f_{t\to s}(x)|_{s=t} = -v(x,t)`.
    Since :math:`f_{t\to s}(x) = x + (s - t)F`, the derivative in the target time s is +F (x_s moves along
    dx/ds = v); the minus sign belongs to the derivative in the source time t. A flow map only jumps down
    (s <= t), so the stencils stay on that side: :math:`g'(0) \approx (3g(0) - 4g(-h) + g(-2h))/(2h)`.
    """
    torch.manual_seed(0)
    f = FlowMap(MLP(2, hidden=16, depth=2, num_classes=2), param).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    cond = torch.tensor([0, 1, -1, 0, 1, -1])
    h = 1e-6
    fd = (3 * f(x, t, t, cond) - 4 * f(x, t, t - h, cond) + f(x, t, t - 2 * h, cond)) / (2 * h)
    v = f.velocity(x, t, cond)
    assert torch.allclose(v, fd, rtol=1e-7, atol=1e-7)
    fd_t = (-3 * f(x, t, t, cond) + 4 * f(x, t + h, t, cond) - f(x, t + 2 * h, t, cond)) / (2 * h)
    assert torch.allclose(v, -fd_t, rtol=1e-7, atol=1e-7)
    assert torch.allclose(f.x0(x, t, cond), f(x, t, torch.zeros_like(t), cond), rtol=0, atol=0)


def test_parameterization_formulas() -> None:
    r"""f_{t->s} = x - (t-s) F(x, t, s') with s' = s (average velocity), 0 (consistency), t (velocity)."""
    torch.manual_seed(1)
    net = MLP(2, hidden=16, depth=2).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    t, s = torch.full((4,), 0.7, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64)
    for param, s_net in (("average_velocity", s), ("consistency", torch.zeros_like(t)), ("velocity", t)):
        ref = x - 0.5 * net(x, t, s_net)
        assert torch.allclose(FlowMap(net, param)(x, t, s), ref, rtol=1e-14, atol=1e-14)
    vfm = VelocityFlowMap(lambda y, tt, c: -y)
    assert torch.allclose(vfm(x, t, s), x + 0.5 * x, rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="unknown parameterization"):
        FlowMap(net, "euler")
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\]"):
        FlowMap(net, "velocity")(x, 0.5, 1.5)


def test_teacher_flowmap_composes() -> None:
    """f_{r->s}(f_{t->r}(x)) = f_{t->s}(x) with per-row times; f_{t->t} = id."""
    teacher = load_preset("aniso3", conditional=True)
    fm = TeacherFlowMap(teacher, rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    t = 0.5 + 0.5 * torch.rand(8, generator=g, dtype=torch.float64)
    s = 0.3 * torch.rand(8, generator=g, dtype=torch.float64)
    r = s + (t - s) * torch.rand(8, generator=g, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1])
    direct = fm(x, t, s, cond)
    assert torch.allclose(fm(fm(x, t, r, cond), r, s, cond), direct, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fm(x, t, t, cond), x, rtol=0, atol=1e-12)
    back = fm(direct, s, t, cond)  # the flow is invertible: integrating back returns x
    assert torch.allclose(back, x, rtol=1e-6, atol=1e-6)
    one = solve_adaptive(teacher, x[:1], float(t[0]), float(s[0]), rtol=1e-9, atol=1e-9, cond=cond[:1]).x
    assert torch.allclose(one, direct[:1], rtol=1e-6, atol=1e-6)
    fixed = TeacherFlowMap(teacher, method="rk4", steps=64)(x, t, s, cond)
    assert torch.allclose(fixed, direct, rtol=1e-5, atol=1e-5)


class ExactAverageVelocity(nn.Module):
    r"""Backbone returning :math:`\frac{1}{t-s}\int_s^t v(x_\tau, \tau)\,d\tau` along the exact trajectory.

    The trajectory points x_tau = f_{t->tau}(x) come from a tight dopri5 solve at the Gauss-Legendre nodes
    of [s, t]; with ``n`` nodes the quadrature is exact for polynomials of degree 2n - 1.
    """

    def __init__(self, teacher: nn.Module, n: int = 48) -> None:
        super().__init__()
        self.teacher, self.fm = teacher, TeacherFlowMap(teacher, rtol=1e-10, atol=1e-10)
        nodes, weights = np.polynomial.legendre.leggauss(n)
        self.nodes, self.weights = torch.as_tensor(nodes), torch.as_tensor(weights)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        b, n = x.shape[0], len(self.nodes)
        tau = (0.5 * (t + s)[:, None] + 0.5 * (t - s)[:, None] * self.nodes[None]).reshape(-1)  # (b*n,)
        xr, tr = x.repeat_interleave(n, 0), t.repeat_interleave(n)
        cr = cond.repeat_interleave(n) if cond is not None else None
        x_tau = self.fm(xr, tr, tau, cr)
        v = self.teacher.velocity(x_tau, tau, cr).reshape(b, n, -1)
        return 0.5 * (self.weights[None, :, None] * v).sum(1)


def test_exact_average_velocity_flowmap_matches_teacher() -> None:
    teacher = load_preset("aniso3", conditional=True)
    student = FlowMap(ExactAverageVelocity(teacher), "average_velocity")
    oracle = TeacherFlowMap(teacher, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.8, 0.6, 0.5, 0.95], dtype=torch.float64)
    s = torch.tensor([0.0, 0.5, 0.2, 0.3, 0.1, 0.7], dtype=torch.float64)
    cond = torch.tensor([-1, 0, 1, 2, -1, 1])
    ref = oracle(x, t, s, cond)
    assert torch.allclose(student(x, t, s, cond), ref, rtol=1e-6, atol=1e-6)
    inst = student.velocity(x, t, cond)  # F(x, t, t) is the instantaneous velocity
    assert torch.allclose(inst, teacher.velocity(x, t, cond), rtol=1e-9, atol=1e-9)
    one_step_euler = x - (t - s)[:, None] * teacher.velocity(x, t, cond)
    assert float((one_step_euler - ref).abs().max()) > 1e-2  # the average velocity is not the instantaneous one
