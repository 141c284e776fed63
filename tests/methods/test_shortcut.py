"""Shortcut models: exact-flow-map targets, FM rows, clipping, EMA bootstrap network, learning."""

from __future__ import annotations

import math

import pytest
import torch

from _fixtures import ExactNet
from _fixtures import make_batch as batch64
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.shortcut import shortcut_target
from fewstep.networks.mlp import MLP
from fewstep.teachers import GaussianMixtureTeacher, TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smooth():
    return GaussianMixtureTeacher([0.6, 0.4], [[-1.0, 0.5], [1.0, -0.5]],
                                  [[[0.3, 0.1], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.4]]])


def exact(teacher, **kw):
    cls = get_method("shortcut")
    return cls(FlowMap(ExactNet(teacher, tol=1e-10), "average_velocity"), teacher, cls.make_config(**kw))


def test_two_half_steps_of_exact_map_equal_the_full_step(smooth) -> None:
    """(t-s)F(x,t,s) = d F(x,t,t-d) + d F(x',t-d,s) for the exact average velocity (s = t - 2d)."""
    fm = FlowMap(ExactNet(smooth, tol=1e-10), "average_velocity")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=g, dtype=torch.float64)
    d = torch.tensor([0.5, 0.25, 0.125, 0.0625] * 8, dtype=torch.float64)
    t = torch.ones(32, dtype=torch.float64) * torch.tensor([1.0, 0.75, 0.5, 0.25] * 8, dtype=torch.float64)
    tgt = shortcut_target(fm, x, t, d)
    direct = fm.F(x, t, t - 2 * d)
    assert torch.allclose(tgt, direct, atol=1e-7, rtol=0)
    # the finest-level variant uses the instantaneous velocity: an Euler-like error O(d)
    fin = shortcut_target(fm, x, t, d, finest=torch.ones(32, dtype=torch.bool))
    euler_like = (fin - fm.F(x, t, t - d)).abs().max()
    assert 1e-4 < float(euler_like) < 5.0


def test_loss_vanishes_at_exact_flowmap(smooth) -> None:
    """FM rows at d=0 with teacher targets vanish exactly; self-consistency rows vanish except the finest level."""
    b = batch64(smooth, 128, 0)
    _, logs = exact(smooth, bootstrap_fraction=0.5, levels=4, target_ema=0.0, target_clip=0.0).loss("student", b, 0)
    assert logs["fm"] < 1e-12
    # fm_at_dmin: every half step queried by the bootstrap exists exactly, so those rows vanish to solver accuracy
    _, logs = exact(smooth, bootstrap_fraction=0.5, levels=4, fm_at_dmin=True, target_ema=0.0,
                    target_clip=0.0).loss("student", b, 0)
    assert logs["bootstrap"] < 1e-10 and logs["fm"] > 1e-6  # (FM at d_min regresses F(t, t-d_min) onto v)
    # d=0 FM rows: the finest level (1/levels of the rows) uses Euler half steps, error O(d_min) -> loss
    # ~ d_min^2 / levels, so going from 4 to 6 levels divides it by ~ 16 * 6/4 = 24
    l4 = float(exact(smooth, bootstrap_fraction=1.0, levels=4, target_ema=0.0).loss("student", b, 0)[0])
    l6 = float(exact(smooth, bootstrap_fraction=1.0, levels=6, target_ema=0.0).loss("student", b, 0)[0])
    assert 8.0 < l4 / l6 < 70.0, (l4, l6)


def test_fm_rows_from_data_give_the_conditional_variance(smooth) -> None:
    """target='data': at the exact map the loss is E||v(x_t,t) - (x1 - x0)||^2 over the FM rows exactly."""
    b = batch64(smooth, 64, 3)
    loss, _ = exact(smooth, bootstrap_fraction=0.0, target="data").loss("student", b, 0)
    t = b.u[:, 0]
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    ref = (smooth.velocity(x_t, t) - (b.x1 - b.x0)).pow(2).sum(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-10 and float(ref) > 0.1


def test_target_clipping_and_ema_update() -> None:
    torch.manual_seed(0)
    teacher = load_preset("ring8")
    cls = get_method("shortcut")
    m = cls(FlowMap(MLP(2, hidden=16, depth=1), "average_velocity"), teacher, cls.make_config(target_ema=0.75))
    with torch.no_grad():
        for p in m.student.net.parameters():
            p.mul_(50.0)  # large outputs
    x, t = torch.randn(64, 2), torch.ones(64)
    with torch.no_grad():
        tgt = shortcut_target(m.student, x, t, torch.full((64,), 0.25), clip=0.5)
        raw = shortcut_target(m.student, x, t, torch.full((64,), 0.25))
    assert float(tgt.abs().max()) <= 0.5 + 1e-7 and float(raw.abs().max()) > 0.5
    assert torch.equal(tgt, raw.clamp(-0.5, 0.5))
    before = [p.clone() for p in m.target_net.parameters()]
    m.after_update("student", 0)
    for old, new, tgt_p in zip(before, m.student.parameters(), m.target_net.parameters()):
        assert torch.allclose(tgt_p, 0.75 * old + 0.25 * new, atol=1e-5)
    assert set(m.trainable()) == {"student"} and all(not p.requires_grad for p in m.target_net.parameters())
    with pytest.raises(ValueError, match="t - 2d"):
        shortcut_target(m.student, x, torch.full((64,), 0.3), torch.full((64,), 0.25))


def test_shortcut_learns_on_small_problem(smooth) -> None:
    """A tiny student's 1-step jump approaches the teacher's ODE endpoint after 300 steps."""
    torch.manual_seed(0)
    cls = get_method("shortcut")
    m = cls(FlowMap(MLP(2, hidden=64, depth=2), "average_velocity"), smooth,
            cls.make_config(levels=4, target_ema=0.9))
    opt = torch.optim.Adam(m.student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(512, 2, generator=g)
    end = TeacherFlowMap(smooth, rtol=1e-6, atol=1e-6)(z.double(), 1.0, 0.0).float()

    def err() -> float:
        with torch.no_grad():
            return float((m.student(z, 1.0, 0.0) - end).pow(2).sum(1).mean())

    e0 = err()
    for step in range(300):
        b = Batch(x1=torch.randn(256, 2, generator=g), u=torch.rand(256, 8, generator=g),
                  x0=smooth.sample(256, generator=g))
        loss, logs = m.loss("student", b, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_update("student", step)
    assert math.isfinite(logs["loss"]) and logs["bootstrap"] > 0
    assert err() < 0.3 * e0, (e0, err())


def test_bad_configs() -> None:
    cls = get_method("shortcut")
    with pytest.raises(ValueError, match="bootstrap_fraction"):
        cls.make_config(bootstrap_fraction=1.5)
    with pytest.raises(ValueError, match="target"):
        cls.make_config(target="ode")
    with pytest.raises(ValueError, match="needs a teacher"):
        cls(FlowMap(MLP(2, hidden=8, depth=1), "average_velocity"), None)
    with pytest.raises(ValueError, match="average_velocity"):
        cls(FlowMap(MLP(2, hidden=8, depth=1), "consistency"), load_preset("ring8"))
    m = cls(FlowMap(MLP(2, hidden=8, depth=1), "average_velocity"), None, cls.make_config(target="data"))
    with pytest.raises(ValueError, match="x0"):
        m.loss("student", Batch(x1=torch.randn(4, 2), u=torch.rand(4, 8)), 0)
