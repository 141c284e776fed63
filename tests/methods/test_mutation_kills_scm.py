r"""Tests added to kill mutants of methods/scm.py (tools/mutation.py): the sCM loss with its three weightings and
the learned-weighting objective against their equations on a probe network
:math:`F(x,t,s,c) = a x + b t + d s + e c + k c t` (the consistency student feeds s = 0), whose JVP along
:math:`(v, 1)` is :math:`a v + b + k c`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor

from _probe_nets import LabelTimeProbe, random_batch, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.flowmap_helpers import consistency_time
from fewstep.methods.base import U_LABEL_DROP
from fewstep.methods.scm import SCM, SCMConfig, TimeWeighting

torch.set_num_threads(1)
N = 24


_Probe = LabelTimeProbe  # F = a x + b t + d s + e c + k c t


_CFG = dict(cond_drop=0.3, time_sampler="uniform", t_min=0.05, t_max=0.95, warmup_steps=10, tangent_norm_c=0.2,
            t_one_fraction=0.25, norm_p=0.5, norm_eps=0.1)


def _setup(weighting: str, distill: bool, step: int, guidance: float = 1.0):
    teacher = two_class_teacher() if distill else None
    net = _Probe()
    m = get_method("scm")(FlowMap(net, "consistency"), teacher,
                          SCM.make_config(weighting=weighting, guidance=guidance, **_CFG))
    b = random_batch(N, 3)
    t = consistency_time(b.u, m.config, 0.25)
    assert bool((t == 0.95).any()) and bool((t < 0.95).any())
    cond = torch.where(b.u[:, U_LABEL_DROP] < 0.3, torch.full_like(b.cond, -1), b.cond)
    assert bool((cond == -1).any()) and bool((cond >= 0).any())
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    if distill:
        v = teacher.velocity(x_t, t, cond, guidance=guidance) if guidance != 1.0 else teacher.velocity(x_t, t, cond)
    else:
        v = b.x1 - b.x0
    r = min(1.0, step / 10)
    with torch.no_grad():
        F = net(x_t, t, torch.zeros_like(t), cond)
        g = F - (v - r * t[:, None] * (net.a * v + (net.b + net.k * cond.to(v.dtype))[:, None]))
        target = F - g / (g.norm(dim=1, keepdim=True) + 0.2)
    err = ((net(x_t, t, torch.zeros_like(t), cond) - target) ** 2).sum(1)
    return m, net, b, t, g, err, r


def _logs(logs: dict[str, float], loss: Tensor, err: Tensor, g: Tensor, r: float) -> None:
    assert set(logs) == {"loss", "mse", "tangent_norm", "warmup_r"}
    assert logs["loss"] == pytest.approx(float(loss), rel=1e-9)
    assert logs["mse"] == pytest.approx(float(err.mean()), rel=1e-9)
    assert logs["tangent_norm"] == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-9)
    assert logs["warmup_r"] == pytest.approx(r, rel=1e-12)


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("step", [4, 30])
@pytest.mark.parametrize("weighting", ["none", "adaptive"])
def test_scm_loss_is_the_equation(weighting: str, distill: bool, step: int) -> None:
    r""":math:`g = F - (v - r t (a v + b + k c))`, target :math:`F - g/(|g| + 0.2)`, e = |F - target|²;
    L = E[e] or E[e/sg((e + 0.1)^0.5)]; the target carries no gradient."""
    m, net, b, _, g, err, r = _setup(weighting, distill, step)
    expected = err.mean() if weighting == "none" else (err / (err.detach() + 0.1) ** 0.5).mean()
    loss, logs = m.loss("student", b, step)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    _logs(logs, loss, err, g, r)
    gr = torch.autograd.grad(loss, [net.a, net.k])
    torch.testing.assert_close(gr, torch.autograd.grad(expected, [net.a, net.k]))


def test_scm_guided_teacher_velocity() -> None:
    """sCD with guidance w = 2.5: v is the guided teacher velocity on every labelled row."""
    m, _, b, _, g, err, r = _setup("none", True, 30, guidance=2.5)
    loss, logs = m.loss("student", b, 30)
    torch.testing.assert_close(loss, err.mean(), rtol=1e-9, atol=1e-12)
    _logs(logs, loss, err, g, r)


def test_learned_weighting_loss_cache_and_objective() -> None:
    r"""Student: :math:`E[e^{w(t)} e/D]` with w detached; cache (t, e/D); weighting:
    :math:`E[e^{w(t)} \bar e - w(t)]`, gradient to the weighting net only."""
    m, net, b, t, g, err, r = _setup("learned", True, 30)
    wn = m.weight_net
    assert isinstance(wn, TimeWeighting)
    assert m.trainable() == {"student": m.student, "weighting": wn}
    assert m.schedule(0) == ["student", "weighting"]
    with torch.no_grad():
        wn.linear.weight.copy_(torch.linspace(-0.5, 0.5, 32)[None])
        wn.linear.bias.fill_(0.2)
    w = wn(t).detach()
    assert float(w.std()) > 0.05
    expected = (torch.exp(w) * err / 2).mean()
    loss, logs = m.loss("student", b, 30)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
    _logs(logs, loss, err, g, r)
    assert torch.autograd.grad(loss, wn.linear.weight, allow_unused=True)[0] is None  # w is detached here
    torch.testing.assert_close(torch.autograd.grad(loss, net.a)[0], torch.autograd.grad(expected, net.a)[0])
    ct, ce = m._cache
    torch.testing.assert_close(ct, t)
    torch.testing.assert_close(ce, err.detach() / 2)
    assert not ct.requires_grad and not ce.requires_grad
    wl, wlogs = m.loss("weighting", b, 30)
    wt = wn(t)
    want = (torch.exp(wt) * err.detach() / 2 - wt).mean()
    torch.testing.assert_close(wl, want.to(wl.dtype), rtol=1e-6, atol=1e-7)
    assert wlogs == {"weighting_loss": pytest.approx(float(want), rel=1e-6)}
    torch.testing.assert_close(torch.autograd.grad(wl, wn.linear.bias)[0],
                               torch.autograd.grad(want, wn.linear.bias)[0], rtol=1e-6, atol=1e-7)


def test_time_weighting_is_a_zero_initialised_linear_map_of_the_embedding() -> None:
    r""":math:`w(t) = W[\sin 2\pi f_k t, \cos 2\pi f_k t]_k + b`, 16 frequencies log-spaced on [1, 8]; zero at init."""
    wn = TimeWeighting()
    t = torch.tensor([0.1, 0.37, 0.8], dtype=torch.float64)
    assert torch.equal(wn(t), torch.zeros(3))
    with torch.no_grad():
        wn.linear.weight.copy_(torch.linspace(-1, 1, 32)[None])
        wn.linear.bias.fill_(0.3)
    f = torch.exp(torch.linspace(0.0, math.log(8.0), 16, dtype=torch.float64))
    arg = 2 * math.pi * t[:, None] * f[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], 1)
    want = emb @ torch.linspace(-1, 1, 32, dtype=torch.float64) + 0.3
    got = wn(t)
    assert wn.linear.weight.shape == (1, 32)  # w_phi(t) is one scalar per time
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert TimeWeighting(8).linear.in_features == 8


def test_no_weighting_net_unless_learned_and_refusals() -> None:
    teacher = two_class_teacher()
    m = SCM(FlowMap(_Probe(), "consistency"), teacher, SCM.make_config(weighting="adaptive"))
    assert m.weight_net is None and m.trainable() == {"student": m.student} and m.schedule(3) == ["student"]
    b = random_batch(4, 0)
    with pytest.raises(ValueError, match="^" + re.escape(
            "unknown network 'fake' for method 'scm'; expected 'student' or 'weighting'") + "$"):
        m.loss("fake", b, 0)
    with pytest.raises(ValueError, match="^" + re.escape(
            "the weighting network exists only with weighting='learned'") + "$"):
        m.loss("weighting", b, 0)
    ml = SCM(FlowMap(_Probe(), "consistency"), teacher, SCM.make_config(weighting="learned"))
    with pytest.raises(ValueError, match="^" + re.escape(
            "the weighting loss needs a student loss evaluated first (schedule order)") + "$"):
        ml.loss("weighting", b, 0)


def test_config_defaults_and_refusals() -> None:
    cfg = SCMConfig()
    assert (cfg.t_min, cfg.tangent_norm_c, cfg.warmup_steps, cfg.weighting, cfg.norm_p, cfg.norm_eps,
            cfg.t_one_fraction) == (1e-3, 0.1, 1000, "none", 1.0, 1e-2, 0.0)
    SCMConfig(t_one_fraction=0.0, warmup_steps=0)
    SCMConfig(t_one_fraction=1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"t_one_fraction must lie in [0, 1]; got {bad}") + "$"):
            SCMConfig(t_one_fraction=bad)
    with pytest.raises(ValueError, match="^" + re.escape(
            "weighting must be one of ('none', 'adaptive', 'learned'); got 'edm'") + "$"):
        SCMConfig(weighting="edm")
    with pytest.raises(ValueError, match="^" + re.escape("warmup_steps must be >= 0; got -1") + "$"):
        SCMConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="^" + re.escape(
            "sCM needs t_min > 0 (the consistency boundary t=0 carries no signal); got t_min=0.0") + "$"):
        SCMConfig(t_min=0.0)
    SCMConfig(t_min=1e-9)
    with pytest.raises(ValueError, match="^logit_std must be positive"):  # the parent's checks still run
        SCMConfig(logit_std=0.0)
