"""PeRFlow: window targets, K-step reproduction of the teacher endpoint, loss decrease, MA per window."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods.base import Batch
from fewstep.methods.perflow import window_grid, window_targets
from fewstep.networks.mlp import MLP
from fewstep.sampling.samplers import sample_flowmap, solve_adaptive
from fewstep.teachers import TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


class WindowOracle(nn.Module):
    """Velocity student equal to the constant window velocity of a fine teacher solve at window starts."""

    parameterization = "velocity"

    def __init__(self, teacher: nn.Module, grid: Tensor) -> None:
        super().__init__()
        self.fine = TeacherFlowMap(teacher, method="rk4", steps=64)
        self.grid = grid

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        idx = torch.searchsorted(-self.grid, -t.double().cpu())  # grid is decreasing
        t_e = self.grid[idx + 1].to(x.dtype)
        return (x - self.fine(x, t, t_e)) / (t - t_e)[:, None]

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x - (t - s)[:, None] * self.velocity(x, t)


def test_k_window_oracle_reproduces_teacher_endpoint() -> None:
    ring8 = load_preset("ring8")
    grid = window_grid(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    x1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = sample_flowmap(WindowOracle(ring8, grid), x1, grid.tolist())
    ref = solve_adaptive(ring8, x1, rtol=1e-9, atol=1e-9).x
    assert res.nfe == 4
    assert torch.allclose(res.x, ref, atol=1e-5)


def test_window_targets_are_the_chord() -> None:
    x_s, x_e = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    t_s, t_e = torch.tensor([0.75]), torch.tensor([0.5])
    x_t, t, v = window_targets(x_s, x_e, t_s, t_e, torch.tensor([0.5]))
    assert torch.allclose(t, torch.tensor([0.625])) and torch.allclose(x_t, torch.tensor([[0.5, 1.5]]))
    assert torch.allclose(v, torch.tensor([[4.0, 4.0]]))
    # one Euler jump with the target velocity lands on x_e from any point of the chord
    assert torch.allclose(x_t - (t - t_e)[:, None] * v, x_e)


def test_oracle_has_zero_window_loss() -> None:
    ring8 = load_preset("ring8")
    cls = get_method("perflow")
    cfg = cls.make_config(num_windows=4, solver="rk4", solve_steps=64)
    grid = window_grid(4)
    m = cls(FlowMap(MLP(2, 8, 1, use_s=False), "velocity"), ring8, cfg)
    g = torch.Generator().manual_seed(1)
    b = Batch(x1=torch.randn(128, 2, generator=g), u=torch.rand(128, 8, generator=g), x0=ring8.sample(128, generator=g))
    b.u[:, 0] = 0.0  # evaluate at the window starts, where the oracle is defined
    m.student = WindowOracle(ring8, grid)
    loss, _ = m.loss("student", b, 0)
    assert float(loss.detach()) < 1e-8


@pytest.mark.parametrize("window_input,param", [("data", "velocity"), ("teacher", "velocity"),
                                                 ("data", "average_velocity")])
def test_perflow_loss_falls(window_input: str, param: str) -> None:
    ring8 = load_preset("ring8")
    cls = get_method("perflow")
    torch.manual_seed(0)
    m = cls(FlowMap(MLP(2, 64, 2, emb_dim=16, use_s=param == "average_velocity"), param), ring8,
            cls.make_config(num_windows=2, window_input=window_input, input_steps=4, ma_weight=0.01, ma_batch=32,
                            ma_t_min=0.05, ma_mode="jump" if param == "average_velocity" else "ode"))
    assert m.uses_data(m.config) == (window_input == "data")
    opt = torch.optim.Adam(m.student.parameters(), lr=3e-3)
    losses = []
    for step in range(100):
        g = torch.Generator().manual_seed(step)
        b = Batch(x1=torch.randn(256, 2, generator=g), u=torch.rand(256, 8, generator=g),
                  x0=ring8.sample(256, generator=g))
        loss, logs = m.loss("student", b, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.student.parameters(), 1.0)
        opt.step()
        losses.append(logs["loss_window"])
    assert "ma_kl" in logs
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_perflow_config_errors() -> None:
    ring8 = load_preset("ring8")
    cls = get_method("perflow")
    st = FlowMap(MLP(2, 8, 1, use_s=False), "velocity")
    with pytest.raises(ValueError, match="window_input"):
        cls(st, ring8, cls.make_config(window_input="noise"))
    with pytest.raises(ValueError, match="from 1 to 0"):
        cls(st, ring8, cls.make_config(windows=[1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="solver"):
        cls(st, ring8, cls.make_config(solver="dopri5"))
    m = cls(st, ring8, cls.make_config(windows=[1.0, 0.6, 0.0]))
    assert m.grid.tolist() == [1.0, 0.6, 0.0]


def test_average_velocity_student_sees_the_window_end() -> None:
    """window_velocity is F(x, t, t_end): an average-velocity student separates the two windows at a shared
    boundary time, a velocity student returns the same value for both."""
    ring8 = load_preset("ring8")
    cls = get_method("perflow")
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    av = cls(FlowMap(MLP(2, 16, 1, use_s=True), "average_velocity"), ring8, cls.make_config(num_windows=2))
    v1, v2 = av.window_velocity(x, t, torch.full((4,), 0.5), None), av.window_velocity(x, t, torch.zeros(4), None)
    assert (v1 - v2).abs().max() > 1e-4
    ve = cls(FlowMap(MLP(2, 16, 1, use_s=False), "velocity"), ring8, cls.make_config(num_windows=2))
    w1, w2 = ve.window_velocity(x, t, torch.full((4,), 0.5), None), ve.window_velocity(x, t, torch.zeros(4), None)
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("k", [0, 1])
def test_perflow_ma_gradient_is_the_window_kl_gradient(k: int) -> None:
    """PeRFlow's MA term (loss with ma_weight=lambda minus loss with 0) has gradient lambda * grad KL_k of window k in
    closed form: a Gaussian teacher, an affine velocity student whose window ODE flow is exp(-hA); window 1 ends
    exactly at t=0 (target: the data marginal smoothed by epsilon = ma_t_min). A sign flip or a clamped window end
    fails it."""
    from fewstep.benchmarks.ma_gradient import AffineVelocity, closed_form_grad
    from fewstep.teachers import GaussianMixtureTeacher

    dt = torch.float64
    m0, s0 = torch.tensor([1.0, -0.5], dtype=dt), torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=dt)
    teacher = GaussianMixtureTeacher([1.0], m0[None], s0[None])
    a0, b0 = torch.tensor([[0.9, 0.3], [-0.2, 0.6]], dtype=dt), torch.tensor([0.4, -0.1], dtype=dt)
    lam, eps, n = 0.5, 0.05, 60_000
    cls = get_method("perflow")
    cfg = cls.make_config(num_windows=2, window_input="data", ma_weight=lam, ma_batch=0, ma_mode="exact",
                          ma_substeps=4, ma_solver="rk4", ma_t_min=eps)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(n, 8, generator=g, dtype=dt)
    u[:, 2] = (k + 0.5) / 2  # every row in window k
    b = Batch(x1=torch.randn(n, 2, generator=g, dtype=dt), u=u, x0=teacher.sample(n, generator=g, dtype=dt))
    grads = []
    for weight in (lam, 0.0):
        student = AffineVelocity(a0, b0)
        m = cls(student, teacher, cfg)
        m.config.ma_weight = weight
        m.loss("student", b, 0)[0].backward()
        grads.append(student.grad())
    g_ma = (grads[0] - grads[1]) / lam
    grid = window_grid(2)
    g_true = closed_form_grad(teacher, a0, b0, float(grid[k]), float(grid[k + 1]), eps)
    # Monte-Carlo gradient with 6e4 samples: relative error ~ 1e-2
    assert float((g_ma - g_true).norm() / g_true.norm()) < 0.05, (g_ma, g_true)


class _RecordS(nn.Module):
    """Average-velocity student that records the (t, s) it is asked about and returns zeros."""

    parameterization = "average_velocity"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, Tensor]] = []

    def F(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        self.seen.append((t.detach().clone(), s.detach().clone()))
        return torch.zeros_like(x)


@pytest.mark.parametrize("second_time", ["window_end", "in_window"])
def test_second_time_of_an_average_velocity_student(second_time: str) -> None:
    """window_end asks only for whole-window jumps F(x_t, t, t_end); in_window draws s ~ U(t_end, t) so every
    jump along the chord is trained (the sampler's K sub-steps per window use them)."""
    ring8 = load_preset("ring8")
    cls = get_method("perflow")
    m = cls(FlowMap(MLP(2, 8, 1, use_s=True), "average_velocity"), ring8,
            cls.make_config(num_windows=2, solve_steps=1, second_time=second_time))
    rec = _RecordS()
    m.student = rec
    g = torch.Generator().manual_seed(0)
    b = Batch(x1=torch.randn(512, 2, generator=g), u=torch.rand(512, 8, generator=g), x0=ring8.sample(512, generator=g))
    m.loss("student", b, 0)
    t, s = rec.seen[-1]
    t_end = torch.where(t > 0.5, torch.full_like(t, 0.5), torch.zeros_like(t))
    if second_time == "window_end":
        assert torch.equal(s, t_end)
    else:
        assert bool(((s >= t_end - 1e-12) & (s <= t + 1e-12)).all())
        frac = (s - t_end) / (t - t_end)
        assert 0.4 < float(frac.mean()) < 0.6 and float(frac.std()) > 0.2  # uniform over [t_end, t]
    with pytest.raises(ValueError, match="second_time"):
        cls(FlowMap(MLP(2, 8, 1, use_s=True), "average_velocity"), ring8, cls.make_config(second_time="end"))


def test_end_fraction_keeps_the_whole_window_jump_on_that_share_of_rows() -> None:
    ring8 = load_preset("ring8")
    cls = get_method("perflow")
    m = cls(FlowMap(MLP(2, 8, 1, use_s=True), "average_velocity"), ring8,
            cls.make_config(num_windows=2, solve_steps=1, second_time="in_window", end_fraction=0.5))
    rec = _RecordS()
    m.student = rec
    g = torch.Generator().manual_seed(1)
    b = Batch(x1=torch.randn(2048, 2, generator=g), u=torch.rand(2048, 8, generator=g),
              x0=ring8.sample(2048, generator=g))
    m.loss("student", b, 0)
    t, s = rec.seen[-1]
    t_end = torch.where(t > 0.5, torch.full_like(t, 0.5), torch.zeros_like(t))
    at_end = (s == t_end).double().mean()
    assert abs(float(at_end) - 0.5) < 0.05
    with pytest.raises(ValueError, match="end_fraction"):
        cls(FlowMap(MLP(2, 8, 1, use_s=True), "average_velocity"), ring8, cls.make_config(end_fraction=1.5))
