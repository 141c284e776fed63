"""IMM: the Laplace-kernel MMD, r(s,t), the weighting, the exact-flow-map limit, EMA targets and learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _fixtures import ExactNet
from _fixtures import make_batch as batch64
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.imm import IMMConfig, imm_r, imm_weight, laplace_mmd2
from fewstep.networks.mlp import MLP
from fewstep.teachers import GaussianMixtureTeacher
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smooth():
    return GaussianMixtureTeacher([0.6, 0.4], [[-1.0, 0.5], [1.0, -0.5]],
                                  [[[0.3, 0.1], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.4]]])


def test_laplace_mmd_zero_for_identical_sets_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    h = torch.full((5,), 0.7, dtype=torch.float64)
    for est in ("v", "u"):
        assert float(laplace_mmd2(y, y.clone(), h, est).abs().max()) < 1e-12
    other = y + 0.3 * torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    assert bool((laplace_mmd2(y, other, h, "v") > 1e-3).all())
    # M = 1 (V-statistic): k_tt + k_rr - 2 k_tr = 2 - 2 exp(-||y_t - y_r|| / h), a consistency loss
    a, b = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[3.0, 4.0]]])
    val = laplace_mmd2(a, b, torch.tensor([2.0]), "v")
    assert abs(float(val) - (2 - 2 * math.exp(-5.0 / 2.0))) < 1e-6
    # a permutation of the particles does not change the MMD (it compares sets)
    perm = other[:, torch.tensor([2, 0, 3, 1])]
    assert torch.allclose(laplace_mmd2(y, other, h), laplace_mmd2(y, perm, h), atol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        laplace_mmd2(y[0], other[0], h[:1])


def test_gradient_is_finite_at_zero_distance() -> None:
    y = torch.zeros(2, 3, 2, requires_grad=True)
    laplace_mmd2(y, torch.zeros(2, 3, 2), torch.ones(2)).sum().backward()
    assert bool(torch.isfinite(y.grad).all())


def test_r_schedule_and_weight() -> None:
    s, t = torch.tensor([0.0, 0.5, 0.0]), torch.tensor([0.5, 0.51, 1.0])
    r = imm_r(s, t, IMMConfig(r_schedule="t", k=4))
    assert torch.allclose(r, torch.tensor([0.5 - 1 / 16, 0.5, 1 - 1 / 16]))  # clipped to s in the middle row
    rel = imm_r(torch.tensor([0.2, 0.0]), torch.tensor([1.0, 0.5]), IMMConfig(r_schedule="relative", k=1))
    assert torch.allclose(rel, torch.tensor([0.6, 0.25]))  # midpoint of [s, t]
    cfg = IMMConfig(r_schedule="eta", k=3, t_eta_max=0.9)
    r = imm_r(torch.zeros(3), torch.tensor([0.5, 0.8, 1.0]), cfg)
    eta = r / (1 - r)
    dec = 9.0 / 8  # eta_max / 2^k with eta_max = 0.9 / 0.1
    assert torch.allclose(eta, torch.tensor([1.0 - dec, 4.0 - dec, 9.0 - dec]).clamp(min=0), atol=1e-5)
    # w(0.5) = 0.5 sigmoid(b) * 2/(0.25) * 0.5/0.5 = 4 sigmoid(b)
    assert abs(float(imm_weight(torch.tensor([0.5]), b=2.0)) - 4 / (1 + math.exp(-2.0))) < 1e-5
    w = imm_weight(torch.linspace(0, 1, 101))
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all()) and abs(float(w[-1]) - 1.0) < 1e-3


def test_unbiased_loss_vanishes_in_expectation_at_exact_flowmap(smooth) -> None:
    """y_t = f_{t->s}(x_t) and y_r = f_{r->s}(x_r) both follow p_s: the i != j estimator has mean 0.

    k = 0 makes r = s, so y_r = x_s are exact samples of p_s and the loss compares f_{t->s}#p_t with p_s directly.
    """
    cls = get_method("imm")
    exact = cls(FlowMap(ExactNet(smooth, tol=1e-8), "average_velocity"), None,
                cls.make_config(estimator="u", group_size=8, k=0, kernel_scale=0.25, target_ema=0.0))
    vals = torch.tensor([float(exact.loss("student", batch64(smooth, 256, i), 0)[0]) for i in range(6)])
    mean, se = float(vals.mean()), float(vals.std() / math.sqrt(len(vals)))
    assert abs(mean) < 3 * se + 1e-4, (mean, se)
    # a wrong map (the identity, F = 0) is clearly detected with the same batches
    wrong = cls(FlowMap(MLP(2, hidden=4, depth=1).double(), "average_velocity"), None,
                cls.make_config(estimator="u", group_size=8, k=0, kernel_scale=0.25))
    for p in wrong.student.parameters():
        nn.init.zeros_(p)
    wrong.target.load_state_dict(wrong.student.state_dict())
    bad = torch.tensor([float(wrong.loss("student", batch64(smooth, 256, i), 0)[0].detach()) for i in range(6)])
    diff = bad - vals  # paired on the same batches
    assert float(diff.mean()) > 4 * float(diff.std() / math.sqrt(len(diff))), (vals, bad)


def test_v_loss_at_exact_flowmap_vanishes_as_r_to_t(smooth) -> None:
    """With all pairs (V-statistic) the loss at the exact map -> 0 as the gap t - r -> 0 (y_r -> y_t)."""
    cls = get_method("imm")
    b = batch64(smooth, 128, 0)
    exact = FlowMap(ExactNet(smooth, tol=1e-8), "average_velocity")
    vals = [float(cls(exact, None, cls.make_config(k=k, target_ema=0.0)).loss("student", b, 0)[0]) for k in (2, 5, 8)]
    assert vals[0] > vals[1] > vals[2] and vals[2] < 0.2 * vals[0], vals


def test_ema_target_and_bad_inputs() -> None:
    torch.manual_seed(0)
    cls = get_method("imm")
    m = cls(FlowMap(MLP(2, hidden=16, depth=1), "average_velocity"), None, cls.make_config(target_ema=0.5))
    before = [p.clone() for p in m.target.parameters()]
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(2.0)
    m.after_update("student", 0)
    for old, new, tgt in zip(before, m.student.parameters(), m.target.parameters()):
        assert torch.allclose(tgt, 0.5 * old + 0.5 * new, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        m.loss("student", Batch(x1=torch.randn(6, 2), u=torch.rand(6, 8), x0=torch.randn(6, 2)), 0)
    with pytest.raises(ValueError, match="x0"):
        m.loss("student", Batch(x1=torch.randn(8, 2), u=torch.rand(8, 8)), 0)
    with pytest.raises(ValueError, match="estimator"):
        cls.make_config(estimator="w")
    with pytest.raises(ValueError, match="group_size"):
        cls.make_config(estimator="u", group_size=1)


def test_imm_learns_on_small_problem() -> None:
    """The 2-step samples of a tiny student move towards the data (MMD² vs exact samples drops)."""
    from fewstep.evaluation.metrics import mmd2
    from fewstep.sampling.samplers import sample_flowmap

    torch.manual_seed(0)
    teacher = load_preset("aniso3")
    cls = get_method("imm")
    m = cls(FlowMap(MLP(2, hidden=64, depth=2), "average_velocity"), None, cls.make_config(k=4))
    opt = torch.optim.Adam(m.student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    z, ref = torch.randn(1000, 2, generator=g), teacher.sample(1000, generator=g)

    def mmd() -> float:
        with torch.no_grad():
            return mmd2(sample_flowmap(m.student, z, 2).x, ref)

    e0 = mmd()
    for step in range(300):
        b = Batch(x1=torch.randn(256, 2, generator=g), u=torch.rand(256, 8, generator=g),
                  x0=teacher.sample(256, generator=g))
        loss, _ = m.loss("student", b, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_update("student", step)
    assert mmd() < 0.6 * e0, (e0, mmd())


def test_corner_fractions_draw_t_one_and_s_zero_groups() -> None:
    """t_one_fraction / s_zero_fraction: that share of the groups has t = 1 / s = 0; particles share (s, r, t)."""
    cls = get_method("imm")
    m = cls(FlowMap(MLP(2, hidden=8, depth=1), "average_velocity"), None,
            cls.make_config(group_size=4, t_one_fraction=0.3, s_zero_fraction=0.5, k=2))
    u = torch.rand(4 * 5000, 8, generator=torch.Generator().manual_seed(2))
    s, r, t = m.group_times(u, 5000)
    tg, sg, rg = t[::4], s[::4], r[::4]
    assert torch.equal(t.reshape(-1, 4), tg[:, None].expand(-1, 4))
    assert torch.equal(s.reshape(-1, 4), sg[:, None].expand(-1, 4))
    assert abs(float((tg == 1.0).float().mean()) - 0.3) < 0.02
    assert abs(float((sg == 0.0).float().mean()) - 0.5) < 0.02
    corner = (tg == 1.0) & (sg == 0.0)
    assert abs(float(corner.float().mean()) - 0.15) < 0.015  # independent choices
    assert torch.allclose(rg[corner], torch.full_like(rg[corner], 0.75))  # r = max(s, t - 2^-k)
    base = cls(FlowMap(MLP(2, hidden=8, depth=1), "average_velocity"), None, cls.make_config(group_size=4))
    s0, _, t0 = base.group_times(u, 5000)
    assert float(((t0[::4] > 0.95) & (s0[::4] < 0.05)).float().mean()) < 0.005  # the corner is undersampled
    with pytest.raises(ValueError, match="t_one_fraction"):
        cls.make_config(t_one_fraction=-0.1)
