r"""Tests added to kill mutants of methods/reflow.py (tools/mutation.py): the losses against their equations.

Reflow: :math:`E\|v_\theta(x_t, t, c) - (x_1 - x_0)\|^2 + \lambda L_{MA}` on the window [1 -> 0]; reflow_distill:
:math:`E\|f_\theta(x_1, 1, 0, c) - x_0\|^2 + \lambda L_{MA}` of its jump; both on hand-set pairs and a probe
network whose output is an explicit formula, the MA term recomputed with :func:`ma_loss` directly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import LinearProbe as _Probe
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods._shared.alignment import ma_loss
from fewstep.methods._shared.pairs import Pairs
from fewstep.methods.base import U_SELECT, U_T
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
N = 16


class _NoParam(nn.Module):
    """A student with no ``parameterization`` attribute."""

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x


def _teacher() -> GaussianMixtureTeacher:
    """Two classes whose components sit apart, so the conditional score differs from the unconditional one."""
    cov = torch.eye(2, dtype=torch.float64)[None].repeat(2, 1, 1) * 0.3
    return GaussianMixtureTeacher([0.5, 0.5], [[2.0, 0.0], [-1.0, 1.5]], cov, classes=[0, 1])


def _pairs_and_batch() -> tuple[Pairs, Batch]:
    """N pairs (x1, x0, labels in {0, 1}) and a batch whose U_SELECT column takes them in order."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(N, 2, generator=g, dtype=torch.float64) * 0.5 + 1.0
    cond = torch.randint(0, 2, (N,), generator=g)
    u = torch.rand(N, 8, generator=g, dtype=torch.float64)
    u[:, U_SELECT] = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    return Pairs(x1, x0, cond, {}), Batch(x1=torch.zeros(N, 2, dtype=torch.float64), u=u)


def _method(name: str, param: str, **cfg: object):
    cls = get_method(name)
    net = _Probe()
    m = cls(FlowMap(net, param), _teacher(), cls.make_config(**cfg))
    pairs, b = _pairs_and_batch()
    m.pairs = pairs
    return m, net, pairs, b


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal"])
def test_reflow_loss_is_fm_on_pairs(sampler: str) -> None:
    r""":math:`L = E\|v(x_t, t, c) - (x_1 - x_0)\|^2` with :math:`t = \sigma(m + s\,\Phi^{-1}(u))` (logit-normal)."""
    m, net, p, b = _method("reflow", "velocity", time_sampler=sampler, logit_mean=0.6, logit_std=0.5)
    u = b.u[:, U_T]
    t = u if sampler == "uniform" else torch.sigmoid(0.6 + 0.5 * math.sqrt(2) * torch.erfinv(2 * u - 1))
    x_t = (1 - t)[:, None] * p.x0 + t[:, None] * p.x1
    expected = ((net(x_t, t, t, p.cond) - (p.x1 - p.x0)) ** 2).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert logs["loss_fm"] == pytest.approx(float(expected), rel=1e-9)
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-9)
    # the gradient is that of the equation: d/da of mean((a x_t + ... - dx)^2)
    (g,) = torch.autograd.grad(loss, net.a)
    (g_ref,) = torch.autograd.grad(((net(x_t, t, t, p.cond) - (p.x1 - p.x0)) ** 2).mean(), net.a)
    torch.testing.assert_close(g, g_ref)


def test_reflow_loss_adds_the_conditional_ma_term() -> None:
    """With ma_weight > 0: loss = FM + lambda * L_MA(student ODE over [1, 0] from the pair noise, labels c)."""
    m, net, p, b = _method("reflow", "velocity", ma_weight=0.5, ma_batch=0, ma_substeps=2)
    t = b.u[:, U_T]
    x_t = (1 - t)[:, None] * p.x0 + t[:, None] * p.x1
    fm = ((net(x_t, t, t, p.cond) - (p.x1 - p.x0)) ** 2).mean()
    ma = ma_loss(m.student, m.teacher, p.x1, 1.0, 0.0, p.cond, mode="ode", substeps=2, solver="rk4",
                 t_min=0.02).loss
    ma_uncond = ma_loss(m.student, m.teacher, p.x1, 1.0, 0.0, None, mode="ode", substeps=2, solver="rk4",
                        t_min=0.02).loss
    assert abs(float(ma - ma_uncond)) > 1e-3  # the labels matter for this teacher and student
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, fm + 0.5 * ma, rtol=1e-9, atol=1e-12)
    assert logs["loss_fm"] == pytest.approx(float(fm), rel=1e-9)
    assert logs["ma"] == pytest.approx(float(ma), rel=1e-9)


def test_distill_loss_is_l2_of_the_jump() -> None:
    r""":math:`L = E\|f(x_1, 1, 0, c) - x_0\|^2` with f = x - (t - s) F (average velocity), labels passed."""
    m, net, p, b = _method("reflow_distill", "average_velocity")
    one, zero = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    f = p.x1 - net(p.x1, one, zero, p.cond)
    expected = ((f - p.x0) ** 2).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert logs["loss_pair"] == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("param", ["average_velocity", "consistency"])
def test_distill_loss_adds_the_jump_ma_term(param: str) -> None:
    """loss = L2 + lambda * L_MA(jump 1 -> 0 from the pair noise, labels c); both student kinds are accepted."""
    m, net, p, b = _method("reflow_distill", param, ma_weight=0.7, ma_batch=0)
    one, zero = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    l2 = ((m.student(p.x1, one, zero, p.cond) - p.x0) ** 2).mean()
    ma = ma_loss(m.student, m.teacher, p.x1, 1.0, 0.0, p.cond, mode="jump", t_min=0.02).loss
    ma_uncond = ma_loss(m.student, m.teacher, p.x1, 1.0, 0.0, None, mode="jump", t_min=0.02).loss
    assert abs(float(ma - ma_uncond)) > 1e-3
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, l2 + 0.7 * ma, rtol=1e-9, atol=1e-12)
    assert logs["ma"] == pytest.approx(float(ma), rel=1e-9)


def test_distill_refuses_students_and_modes_by_name() -> None:
    cls = get_method("reflow_distill")
    with pytest.raises(ValueError, match=r"^reflow_distill needs an average_velocity or consistency student; "
                                         r"got ''$"):
        cls(_NoParam(), _teacher(), cls.make_config())
    with pytest.raises(ValueError, match=r"got 'velocity'$"):
        cls(FlowMap(_Probe(), "velocity"), _teacher(), cls.make_config())
    msg = (r"^reflow_distill aligns its one-step jump: use ma_mode='jump' \(a one-step map has no trained "
           r"instantaneous velocity for ma_mode='ode'\)$")
    for w in (0.5, 2.0):
        with pytest.raises(ValueError, match=msg):
            cls(FlowMap(_Probe(), "average_velocity"), _teacher(), cls.make_config(ma_weight=w, ma_mode="ode"))
    # accepted: MA off with any mode, MA on in jump mode, a consistency student
    cls(FlowMap(_Probe(), "average_velocity"), _teacher(), cls.make_config(ma_weight=0.0, ma_mode="ode"))
    cls(FlowMap(_Probe(), "average_velocity"), _teacher(), cls.make_config(ma_weight=1.0, ma_mode="jump"))
    cls(FlowMap(_Probe(), "consistency"), _teacher(), cls.make_config())
