"""MeanFlow: the identity on exact quadrature, a vanishing loss for the exact student, weights, sampling, training.

This file also holds the "exact student" shared by the flow-map method tests (test_splitmeanflow, test_scm,
test_facm, test_ayf): a backbone whose F(x,t,s) is the teacher's exact average velocity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from _fixtures import exact_student, make_batch, train_and_measure
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.flowmap_helpers import adaptive_weight, sample_t_s, tangent_normalize, warmup_ratio
from fewstep.methods.base import Batch
from fewstep.methods.meanflow import MeanFlow
from fewstep.networks.mlp import MLP
from fewstep.teachers.flowmap import TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ring8() -> nn.Module:
    return load_preset("ring8").double()


def test_meanflow_identity_on_quadrature(ring8: nn.Module) -> None:
    """v(x_t,t) = u + (t-s) du/dt for u = (1/(t-s)) int_s^t v(x_tau,tau) dtau by 24-point Gauss-Legendre."""
    g = torch.Generator().manual_seed(0)
    n, eps = 8, 1e-3
    x = ring8.sample(n, t=0.7, generator=g, dtype=torch.float64)
    t, s = torch.full((n,), 0.7, dtype=torch.float64), torch.full((n,), 0.3, dtype=torch.float64)
    flow = TeacherFlowMap(ring8.velocity, rtol=1e-11, atol=1e-11)
    nodes, weights = (torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(24))

    def avg(end: Tensor) -> Tensor:
        """(1/(end-s)) int_s^end v(X(tau), tau) dtau along the trajectory X through (x, t) (end may exceed t)."""
        taus = s[:, None] + (end - s)[:, None] * (nodes[None] + 1) / 2  # (n, 24)
        pts = flow(x.repeat_interleave(24, 0), t.repeat_interleave(24), taus.reshape(-1))
        v = ring8.velocity(pts, taus.reshape(-1)).reshape(n, 24, 2)
        return 0.5 * (weights[None, :, None] * v).sum(1)

    u = avg(t)
    assert torch.allclose(u, (x - flow(x, t, s)) / 0.4, atol=1e-8)  # quadrature = flow-map definition
    du_dt = (avg(t + eps) - avg(t - eps)) / (2 * eps)  # total derivative along the trajectory
    v = ring8.velocity(x, t)
    assert float((v - u - 0.4 * du_dt).abs().max()) < 1e-5
    assert float((v - u).abs().max()) > 0.05  # the (t-s) dF/dt term matters: the identity is not trivial


@pytest.mark.parametrize("preset", ["ring8", "aniso3"])
def test_exact_student_loss_vanishes(preset: str) -> None:
    """With F = exact average velocity the MeanFlow residual is at solver / finite-difference accuracy."""
    teacher = load_preset(preset).double()
    cfg = MeanFlow.make_config(jvp_mode="fd", t_min=0.2, t_max=0.9, time_sampler="uniform", norm_p=0.0,
                               equal_fraction=0.25)
    batch = make_batch(teacher, 12, seed=1)
    loss, logs = MeanFlow(exact_student(teacher), teacher, cfg).loss("student", batch, 0)
    assert float(loss) < 1e-8
    bad, _ = MeanFlow(exact_student(teacher, offset=0.05), teacher, cfg).loss("student", batch, 0)
    assert float(bad) > 1e-3  # a wrong student is detected: |offset|^2 * dim = 5e-3 on the s=t rows alone


def test_adaptive_weight_value_and_gradient() -> None:
    """L = Δ/sg((Δ+c)^p): value Δ/(Δ+c)^p and gradient (Δ+c)^-p (not that of the quotient)."""
    delta = torch.tensor([0.0, 0.01, 1.0, 100.0], dtype=torch.float64, requires_grad=True)
    out = adaptive_weight(delta, 1.0, 0.01)
    out.sum().backward()
    expect = torch.tensor([0.0, 0.5, 1.0 / 1.01, 100.0 / 100.01], dtype=torch.float64)
    assert torch.allclose(out.detach(), expect, atol=1e-12)
    assert torch.allclose(delta.grad, 1.0 / (delta.detach() + 0.01), atol=1e-12)
    assert torch.equal(adaptive_weight(delta.detach(), 0.0, 0.01), delta.detach())  # p = 0: plain L2
    half = adaptive_weight(torch.tensor([3.0]), 0.5, 1.0)
    assert abs(float(half) - 3.0 / 2.0) < 1e-7


def test_time_sampling_fraction_order_and_logit_normal() -> None:
    u = torch.rand(20000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, s = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.3)
    assert bool((t >= s).all()) and 0 <= float(s.min()) and float(t.max()) <= 1
    assert abs(float((t == s).double().mean()) - 0.3) < 0.015
    both = torch.cat([torch.maximum(t, s), torch.minimum(t, s)])  # the two unordered logit-normal draws
    a = torch.special.logit(torch.sigmoid(-0.4 + torch.special.ndtri(u[:, 0].clamp(1e-6, 1 - 1e-6))))
    assert abs(float(a.mean()) + 0.4) < 0.03 and abs(float(a.std()) - 1.0) < 0.03
    assert float(both.min()) > 0
    tu, su = sample_t_s(u, "uniform", 0.0, 1.0, 0.0, t_min=0.2, t_max=0.6)
    assert 0.2 <= float(su.min()) and float(tu.max()) <= 0.6
    assert abs(float(tu.mean()) - (0.2 + 0.4 * 2 / 3)) < 0.01  # E[max of two uniforms] = 2/3 of the range
    with pytest.raises(ValueError, match="unknown time sampler"):
        sample_t_s(u, "beta", 0.0, 1.0, 0.5)


def test_corner_rows_and_backward_compatibility() -> None:
    """Rows with u4 < corner_fraction sit at (t_max, t_min); s = t on equal_fraction of the others."""
    u = torch.rand(40000, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t0, s0 = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.3)
    t, s = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.3, corner_fraction=0.0)
    assert torch.equal(t, t0) and torch.equal(s, s0)  # corner 0 = the old sampler, bit for bit
    t, s = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.3, corner_fraction=0.2)
    corner = (t == 1.0) & (s == 0.0)
    assert abs(float(corner.double().mean()) - 0.2) < 0.01
    assert abs(float((t == s).double().mean()) - 0.3 * 0.8) < 0.01
    assert torch.equal(t[~corner], t0[~corner]) and torch.equal(s[~corner], s0[~corner])
    tc, sc = sample_t_s(u, "uniform", 0.0, 1.0, 0.0, t_min=0.2, t_max=0.6, corner_fraction=0.5)
    assert abs(float(((tc == 0.6) & (sc == 0.2)).double().mean()) - 0.5) < 0.01
    assert 0.2 <= float(sc.min()) and float(tc.max()) <= 0.6
    with pytest.raises(ValueError, match="shape"):
        sample_t_s(u[:, :3], "uniform", 0.0, 1.0, 0.0, corner_fraction=0.1)
    with pytest.raises(ValueError, match="corner_fraction"):
        sample_t_s(u, "uniform", 0.0, 1.0, 0.0, corner_fraction=1.5)


def test_zero_rows() -> None:
    """Rows with u5 < zero_fraction get s = t_min with their drawn t; the corner overrides them; 0 = old sampler."""
    u = torch.rand(40000, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t0, s0 = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.5)
    t, s = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.5, zero_fraction=0.0)
    assert torch.equal(t, t0) and torch.equal(s, s0)
    t, s = sample_t_s(u, "logit_normal", -0.4, 1.0, 0.5, zero_fraction=0.25)
    zero = u[:, 5] < 0.25
    assert torch.equal(t, t0) and bool((s[zero] == 0).all()) and torch.equal(s[~zero], s0[~zero])
    assert abs(float((s == 0).double().mean()) - 0.25) < 0.01
    assert abs(float((t == s).double().mean()) - 0.5 * 0.75) < 0.01
    t, s = sample_t_s(u, "uniform", 0.0, 1.0, 0.0, t_min=0.2, zero_fraction=0.5, corner_fraction=0.2)
    corner = u[:, 4] < 0.2
    assert bool(((t[corner] == 1.0) & (s[corner] == 0.2)).all())
    assert bool((s[zero & ~corner] == 0.2).all()) and bool((t >= s).all())
    with pytest.raises(ValueError, match="shape"):
        sample_t_s(u[:, :5], "uniform", 0.0, 1.0, 0.0, zero_fraction=0.1)
    with pytest.raises(ValueError, match="zero_fraction"):
        sample_t_s(u, "uniform", 0.0, 1.0, 0.0, zero_fraction=-0.1)
    with pytest.raises(ValueError, match="zero_fraction"):
        get_method("meanflow").make_config(zero_fraction=1.5)
    cfg = get_method("ayf_emd").make_config(zero_fraction=0.3)
    assert cfg.zero_fraction == 0.3


@pytest.mark.parametrize("name", ["meanflow", "splitmeanflow", "ayf_emd", "ayf_lmd"])
def test_sample_times_and_draw_follow_the_config(name: str) -> None:
    """Every average-velocity method draws (t, s, x_t, x1 - x0, labels) through one path with its config."""
    teacher = load_preset("ring8").double()
    cls = get_method(name)
    cfg = cls.make_config(time_sampler="uniform", equal_fraction=0.5, corner_fraction=0.25, t_min=0.1,
                          cond_drop=0.0)
    method = cls(FlowMap(MLP(2, hidden=16, depth=1), "average_velocity").double(), teacher, cfg)
    batch = make_batch(teacher, 4000, seed=7)
    t, s = method.sample_times(batch)
    want = sample_t_s(batch.u, "uniform", 0.0, 1.0, 0.5, t_min=0.1, corner_fraction=0.25)
    assert torch.equal(t, want[0]) and torch.equal(s, want[1])
    assert abs(float(((t == 1.0) & (s == 0.1)).double().mean()) - 0.25) < 0.03
    t2, s2, x_t, dx, cond = method.draw(batch)
    assert torch.equal(t2, t) and torch.equal(s2, s) and cond is None
    assert torch.allclose(x_t, (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1, atol=1e-12)
    assert torch.allclose(dx, batch.x1 - batch.x0, atol=1e-12)
    with pytest.raises(ValueError, match="corner_fraction"):
        cls.make_config(corner_fraction=-0.1)


def test_warmup_and_tangent_normalisation() -> None:
    assert warmup_ratio(0, 100) == 0.0 and warmup_ratio(50, 100) == 0.5 and warmup_ratio(500, 100) == 1.0
    assert warmup_ratio(50, 100, r_max=0.99) == pytest.approx(0.495) and warmup_ratio(3, 0) == 1.0
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [30.0, 40.0]], dtype=torch.float64)
    n = tangent_normalize(g, 0.1)
    assert torch.allclose(n.norm(dim=1), torch.tensor([5 / 5.1, 0.0, 50 / 50.1], dtype=torch.float64))
    assert torch.allclose(n[0] / n[0].norm(), g[0] / 5)  # direction kept
    assert torch.equal(tangent_normalize(g, 0.0), g)


def test_from_data_mode_matches_manual_flow_matching(ring8: nn.Module) -> None:
    """Without a teacher v = x1 - x0; with every row at s = t the loss is FM on F(x,t,t)."""
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=32, depth=2), "average_velocity").double()
    cfg = MeanFlow.make_config(equal_fraction=1.0, corner_fraction=0.0, norm_p=0.0)
    batch = make_batch(ring8, 64, seed=2)
    method = MeanFlow(student, None, cfg)
    loss, _ = method.loss("student", batch, 0)
    t, s = method.sample_times(batch)
    assert torch.equal(t, s)
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    manual = ((student.F(x_t, t, t) - (batch.x1 - batch.x0)) ** 2).sum(1).mean()
    assert abs(float(loss.detach()) - float(manual.detach())) < 1e-10
    with pytest.raises(ValueError, match="needs data"):
        MeanFlow(student, None, cfg).loss("student", Batch(x1=batch.x1, u=batch.u), 0)


def test_guided_velocity_formulas() -> None:
    """From data: ω(x1-x0) + (1-ω-κ)F(∅) + κF(c) inside the t-range; teacher mode: CFG with the teacher."""
    teacher = load_preset("ring8", conditional=True).double()
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=32, depth=2, num_classes=4), "average_velocity").double()
    cfg = MeanFlow.make_config(omega=2.0, kappa=0.5, guidance_t_min=0.3, guidance_t_max=0.8, cond_drop=0.0)
    m = MeanFlow(student, None, cfg)
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0.1, 0.4, 0.5, 0.7, 0.9, 0.5], dtype=torch.float64)
    dx, cond = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, -1])
    got = m.guided_velocity(x, t, dx, cond)
    f_u, f_c = student.F(x, t, t, torch.full_like(cond, -1)), student.F(x, t, t, cond)
    want = 2.0 * dx - 1.5 * f_u + 0.5 * f_c
    inside = torch.tensor([False, True, True, True, False, False])
    assert torch.allclose(got[inside], want[inside].detach(), atol=1e-12)
    assert torch.allclose(got[~inside], dx[~inside], atol=0)  # outside the range / null label: plain x1 - x0
    md = MeanFlow(student, teacher, MeanFlow.make_config(guidance=3.0, guidance_t_min=0.3,
                                                         guidance_t_max=0.8))
    v = md.velocity(x, t, dx, cond)
    assert torch.allclose(v[inside], teacher.velocity(x, t, cond, guidance=3.0)[inside], atol=1e-12)
    assert torch.allclose(v[~inside], teacher.velocity(x, t, cond)[~inside], atol=1e-12)


def test_meanflow_loss_falls_and_average_velocity_improves() -> None:
    before, after, first, last = train_and_measure("meanflow")
    assert after < 0.5 * before
    assert last["mse"] < 0.5 * first["mse"]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown config key"):
        MeanFlow.make_config(ratio=0.5)
    with pytest.raises(ValueError, match="equal_fraction"):
        MeanFlow.make_config(equal_fraction=1.5)
    with pytest.raises(ValueError, match="jvp_mode"):
        MeanFlow.make_config(jvp_mode="forward")
    with pytest.raises(ValueError, match="t_min"):
        MeanFlow.make_config(t_min=0.9, t_max=0.1)
    assert math.isclose(MeanFlow.make_config().norm_eps, 1e-2)
