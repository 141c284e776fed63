r"""Tests added to kill mutants of methods/imm.py (tools/mutation.py): the Laplace-kernel MMD² against a double
loop over the pairs, the r schedules and the weight against hand-computed values, the group times against the
uniforms, and the loss against its equation on the probe flow map :math:`f_{t\to s}(x) = x - (t-s)F(x,t,s,c)`,
:math:`F = a x + b t + d s + e c` (``LinearProbe``), with the stop-gradient target a separate copy.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor

from _probe_nets import LinearProbe, batch_velocity_by_hand, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.imm import IMM, IMMConfig, imm_r, imm_weight, laplace_mmd2

torch.set_num_threads(1)
D64 = torch.float64


def _mmd_loop(yt: Tensor, yr: Tensor, h: Tensor, estimator: str, eps: float) -> Tensor:
    out = []
    for g in range(yt.shape[0]):
        a, b = yt[g].reshape(yt.shape[1], -1), yr[g].reshape(yr.shape[1], -1)
        m = a.shape[0]

        def k(x: Tensor, y: Tensor, g: int = g) -> Tensor:
            return torch.exp(-torch.clamp((x - y).norm(), min=eps) / h[g])

        tot, n = 0.0, 0
        for i in range(m):
            for j in range(m):
                if estimator == "u" and i == j:
                    continue
                tot = tot + k(a[i], a[j]) + k(b[i], b[j]) - k(a[i], b[j]) - k(a[j], b[i])
                n += 1
        out.append(tot / n)
    return torch.stack(out)


@pytest.mark.parametrize("estimator", ["v", "u"])
def test_laplace_mmd2_is_the_pair_sum(estimator: str) -> None:
    g = torch.Generator().manual_seed(0)
    yt, yr = torch.randn(3, 4, 2, 2, generator=g, dtype=D64), torch.randn(3, 4, 2, 2, generator=g, dtype=D64)
    yr[0, 1] = yt[0, 2]  # one zero distance: the floor eps enters
    h = torch.tensor([0.5, 1.0, 3.0], dtype=D64)
    got = laplace_mmd2(yt, yr, h, estimator, eps=0.3)
    torch.testing.assert_close(got, _mmd_loop(yt, yr, h, estimator, 0.3))
    if estimator == "v":
        torch.testing.assert_close(laplace_mmd2(yt, yr, h), _mmd_loop(yt, yr, h, "v", 1e-8))
    # a zero distance gives a finite gradient (the floor)
    y = yt.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(laplace_mmd2(y, yt.clone(), h, estimator).sum(), y)
    assert bool(torch.isfinite(gr).all())


def test_laplace_mmd2_refusals() -> None:
    x = torch.zeros(2, 3, 4)
    for a, b in ((x, x[:, :2]), (x[0], x[0])):
        with pytest.raises(ValueError, match=re.escape(
                f"y_t and y_r must both have shape (groups, M, ...); got {tuple(a.shape)}, {tuple(b.shape)}")):
            laplace_mmd2(a, b, torch.ones(2))


def test_imm_r_schedules() -> None:
    s = torch.tensor([0.0, 0.2, 0.45, 0.0, 0.3], dtype=D64)
    t = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.31], dtype=D64)
    r = imm_r(s, t, IMMConfig(r_schedule="t", k=2))  # max(s, t - 1/4)
    torch.testing.assert_close(r, torch.tensor([0.25, 0.25, 0.45, 0.75, 0.3], dtype=D64))
    torch.testing.assert_close(imm_r(s, t, IMMConfig(r_schedule="t")), torch.maximum(s, t - 1 / 16))
    r = imm_r(s, t, IMMConfig(r_schedule="relative", k=1))  # t - (t - s)/2
    torch.testing.assert_close(r, (t + s) / 2)
    cfg = IMMConfig(r_schedule="eta", k=3, t_eta_max=0.9)  # eta_max = 9, decrement 9/8
    eta_t = torch.clamp(t, max=0.9) / (1 - torch.clamp(t, max=0.9))
    eta_r = (eta_t - 9 / 8).clamp(min=0.0)
    want = torch.maximum(s, torch.minimum(eta_r / (1 + eta_r), t))
    got = imm_r(s, t, cfg)
    torch.testing.assert_close(got, want)
    assert float(got[3]) == pytest.approx((9 - 9 / 8) / (1 + 9 - 9 / 8))  # t = 1 capped at t_eta_max
    assert float(got[0]) == 0.0 and float(got[1]) == pytest.approx(0.2)  # eta_t = 1 < 9/8: r = 0, then max(s, .)
    # with a tiny decrement r would exceed t above t_eta_max: min(r, t) keeps r <= t
    tt = torch.tensor([0.95], dtype=D64)
    assert float(imm_r(torch.zeros(1, dtype=D64), tt, IMMConfig(r_schedule="eta", k=40, t_eta_max=0.99))) == \
        pytest.approx(0.95)


def test_imm_weight_formula() -> None:
    t = torch.tensor([0.1, 0.5, 0.8], dtype=D64)
    lam = 2 * torch.log((1 - t) / t)
    for b, a in ((2.0, 1), (0.5, 2)):
        want = 0.5 * torch.sigmoid(b - lam) * 2 / (t * (1 - t)) * (1 - t) ** a / ((1 - t) ** 2 + t ** 2)
        torch.testing.assert_close(imm_weight(t, b, a), want)
    torch.testing.assert_close(imm_weight(t), 0.5 * torch.sigmoid(2 - lam) * 2 / (t * (1 - t)) * (1 - t) /
                               ((1 - t) ** 2 + t ** 2))
    ends = imm_weight(torch.tensor([0.0, 1.0], dtype=D64))
    tc = torch.tensor([1e-6, 1 - 1e-6], dtype=D64)
    torch.testing.assert_close(ends, imm_weight(tc))
    assert bool(torch.isfinite(ends).all())


def _method(**cfg: object) -> tuple[IMM, LinearProbe]:
    net = LinearProbe()
    return get_method("imm")(FlowMap(net, "average_velocity"), None, IMM.make_config(**cfg)), net


def test_group_times_from_the_first_row_of_each_group() -> None:
    m, _ = _method(group_size=3, t_min=0.2, t_one_fraction=0.3, s_zero_fraction=0.4, r_schedule="t", k=2)
    u = torch.rand(12, 8, generator=torch.Generator().manual_seed(1), dtype=D64)
    u[0, 2], u[3, 2], u[6, 2], u[9, 2] = 0.1, 0.5, 0.9, 0.2  # t = 1 on groups 0 and 3
    u[0, 3], u[3, 3], u[6, 3], u[9, 3] = 0.5, 0.3, 0.1, 0.9  # s = 0 on groups 1 and 2
    s, r, t = m.group_times(u, 4)
    first = u[::3]
    tg = torch.where(first[:, 2] < 0.3, torch.ones(4, dtype=D64), 0.2 + 0.8 * first[:, 0])
    sg = torch.where(first[:, 3] < 0.4, torch.zeros(4, dtype=D64), tg * first[:, 1])
    assert tg.tolist()[0] == 1.0 and sg.tolist()[1] == 0.0
    torch.testing.assert_close(t, tg.repeat_interleave(3))
    torch.testing.assert_close(s, sg.repeat_interleave(3))
    torch.testing.assert_close(r, torch.maximum(sg, tg - 0.25).repeat_interleave(3))
    s2, _, _ = m.group_times(u, 3)  # only the first groups*M rows are read
    assert s2.shape == (9,)
    # fractions 0 switch the point masses off, even for a uniform of exactly 0
    m0, _ = _method(group_size=3, t_min=0.2)
    u[0, 2] = u[0, 3] = 0.0
    s0, _, t0 = m0.group_times(u, 4)
    torch.testing.assert_close(t0[0], 0.2 + 0.8 * u[0, 0])
    torch.testing.assert_close(s0[0], t0[0] * u[0, 1])


def _batch(n: int, seed: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(x1=torch.randn(n, 2, generator=g, dtype=D64), u=torch.rand(n, 8, generator=g, dtype=D64),
                 x0=torch.randn(n, 2, generator=g, dtype=D64) + 1.0, cond=torch.randint(0, 2, (n,), generator=g))


@pytest.mark.parametrize(("estimator", "weighting"), [("v", "uniform"), ("u", "imm")])
def test_loss_is_the_group_mmd_against_the_frozen_target(estimator: str, weighting: str) -> None:
    r""":math:`L = E_g[w\,\mathrm{MMD}^2(f_{t\to s}(x_t), sg f^-_{r\to s}(x_r))]`, bandwidth D(t-s)κ; x_r on the
    same (x0, x1); the target network is the frozen copy taken at construction."""
    m, net = _method(group_size=3, estimator=estimator, weighting=weighting, weight_b=1.0, kernel_scale=0.7,
                     kernel_eps=0.05, r_schedule="relative", k=1, s_zero_fraction=0.3, t_one_fraction=0.3)
    old = LinearProbe()  # the target keeps the initial parameters
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)
    b = _batch(12)
    s, r, t = m.group_times(b.u, 4)
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    x_r = (1 - r)[:, None] * b.x0 + r[:, None] * b.x1
    y_t = x_t - (t - s)[:, None] * net(x_t, t, s, b.cond)
    with torch.no_grad():
        y_r = x_r - (r - s)[:, None] * old(x_r, r, s, b.cond)
    tg, sg = t[::3], s[::3]
    h = (2 * (tg - sg) * 0.7).clamp(min=1e-6)
    mmd = _mmd_loop(y_t.reshape(4, 3, 2), y_r.reshape(4, 3, 2), h, estimator, 0.05)
    w = imm_weight(tg, 1.0) if weighting == "imm" else torch.ones_like(tg)
    expected = (w * mmd).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected)
    assert logs == {"loss": pytest.approx(float(expected)), "mmd2": pytest.approx(float(mmd.mean()))}
    gr = torch.autograd.grad(loss, [net.a, net.b])
    torch.testing.assert_close(gr, torch.autograd.grad(expected, [net.a, net.b]))
    assert all(p.grad is None and not p.requires_grad for p in m.target.parameters())


def test_zero_jump_group_uses_the_bandwidth_floor() -> None:
    """A group with s = t has bandwidth clamp(0, 1e-6): the loss stays finite."""
    m, _ = _method(group_size=2, r_schedule="t", k=1)
    b = _batch(4)
    b.u[:, 1] = 1.0  # s = t * 1 = t
    loss, _ = m.loss("student", b, 0)
    assert bool(torch.isfinite(loss))


def test_after_update_ema_and_refusals() -> None:
    m, net = _method(target_ema=0.25, group_size=2)
    with torch.no_grad():
        net.a.fill_(1.3)
    m.after_update("fake", 0)
    assert float(m.target.net.a) == pytest.approx(0.3)
    m.after_update("student", 0)  # θ⁻ = 0.25 θ⁻ + 0.75 θ
    assert float(m.target.net.a) == pytest.approx(0.25 * 0.3 + 0.75 * 1.3)
    m0, net0 = _method()
    teacher = two_class_teacher()
    assert IMM(FlowMap(LinearProbe(), "average_velocity"), teacher).teacher is teacher  # kept for evaluation
    with torch.no_grad():
        net0.a.fill_(-2.0)
    m0.after_update("student", 0)
    assert float(m0.target.net.a) == -2.0
    b = _batch(5)
    with pytest.raises(ValueError, match="^" + re.escape("imm: batch size 5 must be divisible by group_size 2") + "$"):
        m.loss("student", b, 0)
    with pytest.raises(ValueError, match="^" + re.escape("imm needs data batches (x0) for the pairs (x0, x1)") + "$"):
        m.loss("student", Batch(x1=b.x1, u=b.u), 0)
    with pytest.raises(ValueError, match="average_velocity"):
        IMM(FlowMap(LinearProbe(), "velocity"), None, IMMConfig())


def test_config_defaults_and_refusals() -> None:
    c = IMMConfig()
    assert (c.group_size, c.r_schedule, c.k, c.t_eta_max, c.t_min, c.kernel_scale, c.kernel_eps, c.estimator,
            c.weighting, c.weight_b, c.target_ema, c.t_one_fraction, c.s_zero_fraction) == (
        4, "t", 4, 0.994, 0.0, 1.0, 1e-8, "v", "uniform", 2.0, 0.0, 0.0, 0.0)
    IMMConfig(t_one_fraction=1.0, s_zero_fraction=1.0, group_size=1, k=0, t_min=0.0)
    IMMConfig(estimator="u", group_size=2)
    bad = [
        (dict(t_one_fraction=-0.1), "t_one_fraction and s_zero_fraction must lie in [0, 1]; got -0.1, 0.0"),
        (dict(t_one_fraction=1.1), "t_one_fraction and s_zero_fraction must lie in [0, 1]; got 1.1, 0.0"),
        (dict(s_zero_fraction=-0.1), "t_one_fraction and s_zero_fraction must lie in [0, 1]; got 0.0, -0.1"),
        (dict(s_zero_fraction=1.1), "t_one_fraction and s_zero_fraction must lie in [0, 1]; got 0.0, 1.1"),
        (dict(group_size=0), "group_size must be >= 1; got 0"),
        (dict(r_schedule="x"), "unknown r_schedule 'x'; expected 'eta', 't' or 'relative'"),
        (dict(estimator="w"), "unknown estimator 'w'; expected 'v' or 'u'"),
        (dict(estimator="u", group_size=1), "the unbiased estimator needs group_size >= 2"),
        (dict(weighting="edm"), "unknown weighting 'edm'; expected 'uniform' or 'imm'"),
        (dict(target_ema=1.0), "target_ema must lie in [0, 1); got 1.0"),
        (dict(target_ema=-0.1), "target_ema must lie in [0, 1); got -0.1"),
        (dict(t_min=1.0), "need 0 <= t_min < 1 and 0 < t_eta_max < 1; got 1.0, 0.994"),
        (dict(t_min=-0.1), "need 0 <= t_min < 1 and 0 < t_eta_max < 1; got -0.1, 0.994"),
        (dict(t_eta_max=0.0), "need 0 <= t_min < 1 and 0 < t_eta_max < 1; got 0.0, 0.0"),
        (dict(t_eta_max=1.0), "need 0 <= t_min < 1 and 0 < t_eta_max < 1; got 0.0, 1.0"),
        (dict(k=-1), "need k >= 0 and kernel_scale > 0; got -1, 1.0"),
        (dict(kernel_scale=0.0), "need k >= 0 and kernel_scale > 0; got 4, 0.0"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            IMMConfig(**kw)
    assert math.isclose(IMMConfig(target_ema=0.999).target_ema, 0.999)



@pytest.mark.parametrize("batch_t_min", [0.0, 0.5, 1.0])
def test_batch_interpolant_with_labels_and_batch_t_min_is_the_equation(batch_t_min: float) -> None:
    r"""``interpolant="batch"`` on a labelled batch: :math:`x_r = x_t - (t-r)\hat v(x_t)` with the weights over the
    same-label rows only, on the groups with :math:`t \ge` ``batch_t_min`` (t = 1 groups included at
    batch_t_min = 1, the boundary the config accepts); the others keep :math:`(1-r)x_0 + r x_1`. The loss is the
    group MMD² of the probe flow map against the frozen target at that x_r."""
    m, net = _method(group_size=3, r_schedule="t", k=1, t_one_fraction=0.5, interpolant="batch",
                     batch_t_min=batch_t_min)
    old = LinearProbe()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)
    b = _batch(12, seed=5)
    b.u[::3, 2] = torch.tensor([0.1, 0.9, 0.2, 0.8], dtype=D64)  # t = 1 on groups 0 and 2
    b.u[::3, 0] = torch.tensor([0.3, 0.7, 0.3, 0.2], dtype=D64)  # t = 0.7 and 0.2 on groups 1 and 3
    assert 0 < int(b.cond.sum()) < 12
    s, r, t = m.group_times(b.u, 4)
    assert t[::3].tolist() == [1.0, 0.7, 1.0, 0.2]
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    x_cond = (1 - r)[:, None] * b.x0 + r[:, None] * b.x1
    x_batch = x_t - (t - r)[:, None] * batch_velocity_by_hand(x_t, t, b.x0, b.cond)
    x_r = torch.where((t >= batch_t_min)[:, None], x_batch, x_cond)
    assert bool((t >= batch_t_min).any())
    y_t = x_t - (t - s)[:, None] * net(x_t, t, s, b.cond)
    with torch.no_grad():
        y_r = x_r - (r - s)[:, None] * old(x_r, r, s, b.cond)
    tg, sg = t[::3], s[::3]
    mmd = _mmd_loop(y_t.reshape(4, 3, 2), y_r.reshape(4, 3, 2), (2 * (tg - sg)).clamp(min=1e-6), "v", 1e-8)
    loss, _ = m.loss("student", b, 0)
    torch.testing.assert_close(loss, mmd.mean(), rtol=1e-9, atol=1e-12)


def test_batch_t_min_range() -> None:
    assert IMMConfig().batch_t_min == 0.0
    for v in (0.0, 1.0):
        assert IMMConfig(batch_t_min=v).batch_t_min == v
    for v in (-0.1, 1.1):
        with pytest.raises(ValueError, match="^" + re.escape(f"batch_t_min must lie in [0, 1]; got {v}") + "$"):
            IMMConfig(batch_t_min=v)
