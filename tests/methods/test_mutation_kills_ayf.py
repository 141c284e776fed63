r"""Tests added to kill mutants of methods/ayf.py (tools/mutation.py): the EMD and LMD losses against their
equations on a probe network :math:`F(x,t,s,c) = a x + b t + d s + e c + k c t + q t s` whose JVPs are known by hand:
along :math:`(v, 1, 0)`, :math:`dF/dt = a v + b + k c + q s`; along :math:`(0, 0, 1)`, :math:`\partial_s F = d + q t`.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import random_batch, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods.ayf import AYFConfig, AYFEulerian, AYFLagrangian
from fewstep.methods.base import U_LABEL_DROP

torch.set_num_threads(1)
N = 24


class _Probe(nn.Module):
    """F(x, t, s, c) = a x + b t + d s + e c + k c t + q t s (c: the label, -1 = null; None counts as 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d, self.e, self.k, self.q = (nn.Parameter(torch.tensor(v, dtype=torch.float64))
                                                          for v in (0.3, -0.7, 0.4, 0.5, 0.8, -0.6))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.d * s + self.e * lab + self.k * lab * t + self.q * t * s)[:, None]


def _method(name: str, teacher: nn.Module | None, **cfg: object):
    cls = get_method(name)
    net = _Probe()
    return cls(FlowMap(net, "average_velocity"), teacher, cls.make_config(**cfg)), net


_CFG = dict(norm_p=0.5, norm_eps=0.1, cond_drop=0.3, equal_fraction=0.25, time_sampler="uniform",
            warmup_steps=10, r_max=0.8, tangent_norm_c=0.2)


def _inputs(m, seed: int = 1):
    b = random_batch(N, seed)
    t, s = m.sample_times(b)
    assert bool((t > s).any()) and bool((t == s).any())
    cond = torch.where(b.u[:, U_LABEL_DROP] < 0.3, torch.full_like(b.cond, -1), b.cond)
    assert bool((cond == -1).any()) and bool((cond >= 0).any())
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    return b, t, s, cond, x_t


def _check(m, net: _Probe, b, g: Tensor, target: Tensor, x_t, t, s, cond, r: float, step: int) -> None:
    """loss = E[e/(sg(e)+0.1)^0.5], e = |F - target|^2; logs; the target carries no gradient."""
    err = ((net(x_t, t, s, cond) - target) ** 2).sum(1)
    expected = (err / (err.detach() + 0.1) ** 0.5).mean()
    loss, logs = m.loss("student", b, step)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert set(logs) == {"loss", "mse", "tangent_norm", "warmup_r"}
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-9)
    assert logs["mse"] == pytest.approx(float(err.mean()), rel=1e-9)
    assert logs["tangent_norm"] == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-9)
    assert logs["warmup_r"] == pytest.approx(r, rel=1e-12)
    gr = torch.autograd.grad(loss, [net.a, net.q])
    gr_ref = torch.autograd.grad(expected, [net.a, net.q])
    torch.testing.assert_close(gr, gr_ref)


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize(("step", "r"), [(5, 0.4), (30, 0.8)])
def test_emd_loss_is_the_eulerian_equation(distill: bool, step: int, r: float) -> None:
    r""":math:`g_E = (v - F) - r(t-s)(a v + b + k c + q s)`, target :math:`F + g_E/(|g_E| + 0.2)`."""
    teacher = two_class_teacher() if distill else None
    m, net = _method("ayf_emd", teacher, **_CFG)
    b, t, s, cond, x_t = _inputs(m)
    v = teacher.velocity(x_t, t, cond) if distill else b.x1 - b.x0
    with torch.no_grad():
        F = net(x_t, t, s, cond)
        dF = net.a * v + (net.b + net.k * cond.to(v.dtype) + net.q * s)[:, None]
        g = (v - F) - r * (t - s)[:, None] * dF
        target = F + g / (g.norm(dim=1, keepdim=True) + 0.2)
    _check(m, net, b, g, target, x_t, t, s, cond, r, step)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
@pytest.mark.parametrize(("step", "r"), [(5, 0.4), (30, 0.8)])
def test_lmd_loss_is_the_lagrangian_equation(guidance: float, step: int, r: float) -> None:
    r""":math:`g_L = F - r(t-s)(d + q t) - v_\phi(x_t - (t-s)F, s)`, target :math:`F - g_L/(|g_L| + 0.2)`; the
    teacher is guided (weight w on labelled rows) at the jump end s."""
    teacher = two_class_teacher()
    m, net = _method("ayf_lmd", teacher, guidance=guidance, **_CFG)
    b, t, s, cond, x_t = _inputs(m)
    with torch.no_grad():
        F = net(x_t, t, s, cond)
        x_s = x_t - (t - s)[:, None] * F
        v_s = teacher.velocity(x_s, s, cond, guidance=guidance) if guidance != 1.0 else teacher.velocity(x_s, s, cond)
        g = F - r * (t - s)[:, None] * (net.d + net.q * t)[:, None] - v_s
        target = F - g / (g.norm(dim=1, keepdim=True) + 0.2)
    _check(m, net, b, g, target, x_t, t, s, cond, r, step)


def test_lmd_target_vanishes_at_the_exact_lagrangian_point() -> None:
    r"""Unnormalised (c = 0, r = 1): with F chosen so that :math:`F - (t-s)\partial_s F = v_\phi(x_s, s)` the
    tangent is 0 and the target is F itself (the loss is 0 with a zero-gradient target move)."""
    teacher = two_class_teacher()
    m, net = _method("ayf_lmd", teacher, warmup_steps=0, tangent_norm_c=0.0, equal_fraction=0.0,
                     time_sampler="uniform", cond_drop=0.0)
    b = random_batch(N, 2)
    t, s = m.sample_times(b)
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    _, g = m.tangent(x_t, t, s, torch.zeros_like(x_t), b.cond, 1.0)
    F = net(x_t, t, s, b.cond).detach()
    v_s = teacher.velocity(x_t - (t - s)[:, None] * F, s, b.cond)
    torch.testing.assert_close(g, F - (t - s)[:, None] * (net.d + net.q * t)[:, None] - v_s)
    assert float(g.abs().max()) > 1e-2  # the probe is not the exact map, so g does not vanish here


def test_config_defaults_and_refusals() -> None:
    """AYF's documented defaults, and the refusals with their full messages (r_max 0 and 1 allowed)."""
    cfg = AYFConfig()
    assert (cfg.equal_fraction, cfg.tangent_norm_c, cfg.warmup_steps, cfg.r_max, cfg.norm_p) == (
        0.25, 0.1, 1000, 1.0, 0.0)
    AYFConfig(warmup_steps=0, r_max=0.0)
    AYFConfig(r_max=1.0)
    with pytest.raises(ValueError, match=r"^warmup_steps must be >= 0; got -1$"):
        AYFConfig(warmup_steps=-1)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match=rf"^r_max must lie in \[0, 1\]; got {bad}$"):
            AYFConfig(r_max=bad)
    with pytest.raises(ValueError, match="^logit_std must be positive"):  # the parent's checks still run
        AYFConfig(logit_std=0.0)
    with pytest.raises(ValueError, match=r"^ayf_lmd distils a teacher: it needs a teacher and use_teacher=True$"):
        AYFLagrangian(FlowMap(_Probe(), "average_velocity"), two_class_teacher(), AYFConfig(use_teacher=False))
    assert AYFEulerian.needs_teacher is False and AYFLagrangian.needs_teacher is True


def test_base_tangent_is_abstract() -> None:
    from fewstep.methods.ayf import _AYFBase

    m = _AYFBase.__new__(_AYFBase)
    with pytest.raises(NotImplementedError):
        m.tangent(*(torch.zeros(1),) * 5, 1.0)
