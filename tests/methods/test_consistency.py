"""Discrete consistency models (cd, ct): exact-flow-map limits, distances, EMA targets, curriculum, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _fixtures import ExactNet
from _fixtures import make_batch as batch64
from fewstep.core.ema import ema_update_
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.consistency import ConsistencyConfig, consistency_grid, discretization_steps, pseudo_huber
from fewstep.networks.mlp import MLP
from fewstep.teachers import GaussianMixtureTeacher, TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def exact_method(name: str, teacher, **kw):
    cls = get_method(name)
    return cls(FlowMap(ExactNet(teacher, tol=1e-10), "consistency"), teacher, cls.make_config(**kw))


@pytest.fixture(scope="module")
def smooth():
    """A smooth 2-component mixture (component std >= 0.45) whose flow map is in the asymptotic regime at N >= 8."""
    return GaussianMixtureTeacher([0.6, 0.4], [[-1.0, 0.5], [1.0, -0.5]],
                                  [[[0.3, 0.1], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.4]]])


def slope(ns: list[int], losses: list[float]) -> float:
    """Least-squares slope of log2(loss) against log2(1/N) (the convergence rate in dt = 1/N)."""
    x = torch.tensor([-math.log2(n) for n in ns], dtype=torch.float64)
    y = torch.tensor([math.log2(v) for v in losses], dtype=torch.float64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def test_pseudo_huber_and_l2_values() -> None:
    a, b = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert torch.allclose(pseudo_huber(a, b, 1.0), torch.tensor([math.sqrt(26.0) - 1.0, 0.0]), atol=1e-6)
    # small differences: pseudo-Huber ~ ||a-b||^2 / (2c)
    eps = torch.tensor([[1e-3, 0.0]])
    assert abs(float(pseudo_huber(eps, torch.zeros(1, 2), 0.1)) - 1e-6 / 0.2) < 1e-9


def test_ict_curriculum_and_grid() -> None:
    cfg = ConsistencyConfig(n_schedule="ict", n_min=10, n_max=80, curriculum_steps=400)
    # K' = floor(400 / (log2(8) + 1)) = 100
    assert [discretization_steps(k, cfg) for k in (0, 99, 100, 250, 399, 10_000)] == [10, 10, 20, 40, 80, 80]
    assert discretization_steps(5, ConsistencyConfig(n_steps=17)) == 17
    g = consistency_grid(4)
    assert torch.allclose(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    # the sampled pairs: on the grid without jitter, continuous with jitter, always t' = t - 1/N (or 0)
    m = get_method("ct")(FlowMap(MLP(2, hidden=8, depth=1, use_s=False), "consistency"), None,
                         ConsistencyConfig(n_steps=4, grid_jitter=False))
    u = torch.tensor([0.0, 0.3, 0.99])
    t, tp = m.times(u, 0)
    assert torch.allclose(t, torch.tensor([0.25, 0.5, 1.0])) and torch.allclose(tp, t - 0.25)
    m.config.grid_jitter = True
    t, tp = m.times(u, 0)
    assert torch.allclose(t, torch.tensor([0.0, 0.3, 0.99])) and torch.allclose(tp, (t - 0.25).clamp(min=0))
    ge = consistency_grid(8, "edm")
    assert float(ge[0]) == 0.0 and float(ge[-1]) == 1.0 and bool((ge[1:] > ge[:-1]).all())


@pytest.mark.parametrize("solver,order", [("euler", 2), ("heun", 3)])
def test_cd_loss_vanishes_at_exact_flowmap_at_solver_order(smooth, solver: str, order: int) -> None:
    """d(f(x_t,t), f(step(x_t), t')) is the solver's local error O(dt^order): L2 loss ~ dt^(2*order)."""
    b = batch64(smooth, 64, 0)
    ns = [8, 16, 32, 64]
    losses = [float(exact_method("cd", smooth, solver=solver, distance="l2", n_steps=n, target_ema=0.0)
                    .loss("student", b, 0)[0]) for n in ns]
    assert abs(slope(ns, losses) - 2 * order) < 0.5, losses
    assert losses[-1] < (1e-6 if solver == "euler" else 1e-9), losses


def test_ct_loss_at_exact_flowmap_vanishes_only_as_dt_to_zero(smooth) -> None:
    """CT pairs (x_t, x_t') are not on one ODE trajectory: d = O(dt), so the L2 loss ~ dt^2 (rate 2, not 0)."""
    b = batch64(smooth, 256, 1)
    ns = [8, 16, 32, 64]
    losses = [float(exact_method("ct", smooth, distance="l2", n_steps=n, target_ema=0.0).loss("student", b, 0)[0])
              for n in ns]
    assert abs(slope(ns, losses) - 2.0) < 0.35, losses
    assert losses[-1] > 1e-3  # clearly non-zero at finite dt (vs ~1e-7 for cd-Euler at the same N)


def test_ema_target_update_is_exact() -> None:
    torch.manual_seed(0)
    teacher = load_preset("ring8")
    cls = get_method("cd")
    m = cls(FlowMap(MLP(2, hidden=16, depth=1, use_s=False), "consistency"), teacher, cls.make_config(target_ema=0.9))
    before = [p.clone() for p in m.target.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, m.student.parameters()))  # starts as a copy
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    m.after_update("student", 0)
    for old, new, tgt in zip(before, m.student.parameters(), m.target.parameters()):
        assert torch.allclose(tgt, 0.9 * old + 0.1 * new, atol=1e-6)
        assert not tgt.requires_grad
    assert all(not p.requires_grad for p in m.target.parameters())
    assert set(m.trainable()) == {"student"}
    # target_ema = 0 copies the student (theta^- = sg(theta))
    net2, src = nn.Linear(2, 2), nn.Linear(2, 2)
    ema_update_(net2, src, 0.0)
    assert torch.equal(net2.weight, src.weight)


def test_ema_update_rejects_bad_decay_and_mismatched_networks() -> None:
    """The one EMA primitive: d outside [0, 1] and networks with other parameter names are refused."""
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(a, b, 1.5)
    with pytest.raises(ValueError, match="parameter names"):
        ema_update_(a, nn.Sequential(nn.Linear(2, 2)), 0.5)
    w0 = a.weight.detach().clone()
    ema_update_(a, b, 1.0)
    assert torch.equal(a.weight, w0)


@pytest.mark.parametrize("name,ratio", [("cd", 0.5), ("ct", 0.7)])
def test_consistency_student_learns_on_small_problem(name: str, ratio: float) -> None:
    """A tiny student's 1-step map approaches the teacher's ODE endpoint (cd) / the data (ct) in 300 steps."""
    torch.manual_seed(0)
    teacher = load_preset("aniso3")
    cls = get_method(name)
    m = cls(FlowMap(MLP(2, hidden=64, depth=2, use_s=False), "consistency"), teacher,
            cls.make_config(n_steps=16, target_ema=0.9, distance="l2"))
    opt = torch.optim.Adam(m.student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(512, 2, generator=g)
    end = TeacherFlowMap(teacher, rtol=1e-6, atol=1e-6)(z.double(), 1.0, 0.0).float()

    def err() -> float:
        with torch.no_grad():
            return float((m.student(z, 1.0, 0.0) - end).pow(2).sum(1).mean())

    e0, losses = err(), []
    for step in range(300):
        x0 = teacher.sample(256, generator=g)
        b = Batch(x1=torch.randn(256, 2, generator=g), u=torch.rand(256, 8, generator=g), x0=x0)
        loss, logs = m.loss("student", b, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_update("student", step)
        losses.append(logs["loss"])
    assert math.isfinite(losses[-1])
    assert err() < ratio * e0, (e0, err())  # ct is biased at finite dt (see the rate test)


def test_bad_configs_and_inputs() -> None:
    cls = get_method("cd")
    with pytest.raises(ValueError, match="distance"):
        cls.make_config(distance="lpips")
    with pytest.raises(ValueError, match="solver"):
        cls.make_config(solver="rk4")
    with pytest.raises(ValueError, match="unknown config key"):
        cls.make_config(n_stepz=3)
    teacher = load_preset("ring8")
    with pytest.raises(ValueError, match="consistency"):
        cls(FlowMap(MLP(2, hidden=8, depth=1), "average_velocity"), teacher)
    with pytest.raises(ValueError, match="needs a teacher"):
        cls(FlowMap(MLP(2, hidden=8, depth=1, use_s=False), "consistency"), None)
    m = get_method("ct")(FlowMap(MLP(2, hidden=8, depth=1, use_s=False), "consistency"))
    with pytest.raises(ValueError, match="x0"):
        m.loss("student", Batch(x1=torch.randn(4, 2), u=torch.rand(4, 8)), 0)
