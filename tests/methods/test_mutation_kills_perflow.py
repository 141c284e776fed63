r"""Tests added to kill mutants of methods/perflow.py (tools/mutation.py): the loss against its equation.

With one Euler teacher step per window the window end is hand-computable,
:math:`x_{t_{k+1}} = x_{t_k} - (t_k - t_{k+1})\,v_T(x_{t_k}, t_k, c; w)`, and so is the whole loss
:math:`E\|F(x_t, t, t_{k+1}, c) - (x_{t_k} - x_{t_{k+1}})/(t_k - t_{k+1})\|^2 + \lambda L_{MA}` on a probe network
:math:`F(x,t,s,c) = a x + b t + d s + e\,c` (the MA term recomputed with :func:`ma_loss`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import LinearProbe as _Probe
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods._shared.alignment import ma_loss
from fewstep.methods.base import U_AUX, U_S, U_SELECT, U_T
from fewstep.methods.perflow import window_grid, window_targets
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
N = 24


class _Bare(nn.Module):
    """A velocity student with neither ``parameterization`` nor ``F`` (PeRFlow treats it as a velocity student)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.w * x - t[:, None]


class _VelocityOnly(nn.Module):
    """A velocity student without ``F``: v(x, t, c) = 0.5 x - t (+ label)."""

    parameterization = "velocity"

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.w * x - (t + lab)[:, None]


def _teacher() -> GaussianMixtureTeacher:
    cov = torch.eye(2, dtype=torch.float64)[None].repeat(2, 1, 1) * 0.3
    return GaussianMixtureTeacher([0.5, 0.5], [[2.0, 0.0], [-1.0, 1.5]], cov, classes=[0, 1])


def _batch() -> Batch:
    g = torch.Generator().manual_seed(4)
    return Batch(x1=torch.randn(N, 2, generator=g, dtype=torch.float64),
                 u=torch.rand(N, 8, generator=g, dtype=torch.float64),
                 x0=torch.randn(N, 2, generator=g, dtype=torch.float64) + 1.0,
                 cond=torch.randint(0, 2, (N,), generator=g))


def _euler(teacher: GaussianMixtureTeacher, x: Tensor, t0: Tensor, t1: Tensor, cond: Tensor, w: float) -> Tensor:
    return x - (t0 - t1)[:, None] * teacher.velocity(x, t0, cond, guidance=w)

def _two_window_targets(teacher: Any, b: Any) -> tuple[Tensor, ...]:
    """Two windows on [1, 0.5, 0]: each row's window from u[:, U_SELECT], its start x_s on the straight path, its end
    by one Euler step of the teacher, and the window's chord targets at u[:, U_T] (by hand)."""
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    k = (b.u[:, U_SELECT] * 2).long()
    t_s, t_e = grid[k], grid[k + 1]
    x_s = (1 - t_s)[:, None] * b.x0 + t_s[:, None] * b.x1
    x_e = _euler(teacher, x_s, t_s, t_e, b.cond, 1.0)
    return (t_s, t_e, x_s, x_e, *window_targets(x_s, x_e, t_s, t_e, b.u[:, U_T]))



@pytest.mark.parametrize(("window_input", "param", "guidance"), [("data", "velocity", 1.0),
                                                                 ("teacher", "velocity", 2.0),
                                                                 ("data", "average_velocity", 1.0)])
def test_loss_is_the_window_equation(window_input: str, param: str, guidance: float) -> None:
    teacher = _teacher()
    cls = get_method("perflow")
    net = _Probe()
    m = cls(FlowMap(net, param), teacher,
            cls.make_config(windows=[1.0, 0.7, 0.2, 0.0], window_input=window_input, solver="euler",
                            solve_steps=1, input_steps=1, guidance=guidance))
    b = _batch()
    grid = torch.tensor([1.0, 0.7, 0.2, 0.0], dtype=torch.float64)
    k = (b.u[:, U_SELECT] * 3).long()
    assert set(k.tolist()) == {0, 1, 2}
    t_s, t_e = grid[k], grid[k + 1]
    if window_input == "data":
        x_s = (1 - t_s)[:, None] * b.x0 + t_s[:, None] * b.x1
    else:
        x_s = _euler(teacher, b.x1, torch.ones(N, dtype=torch.float64), t_s, b.cond, guidance)
    x_e = _euler(teacher, x_s, t_s, t_e, b.cond, guidance)
    u = b.u[:, U_T]
    t = t_s + u * (t_e - t_s)
    x_t = x_s + u[:, None] * (x_e - x_s)
    target = (x_s - x_e) / (t_s - t_e)[:, None]
    second = t if param == "velocity" else t_e
    expected = ((net(x_t, t, second, b.cond) - target) ** 2).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert logs["loss_window"] == pytest.approx(float(expected), rel=1e-9)
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-9)
    assert set(logs) == {"loss_window", "loss"}


@pytest.mark.parametrize(("param", "mode"), [("velocity", "ode"), ("average_velocity", "jump")])
def test_loss_adds_the_window_ma_term(param: str, mode: str) -> None:
    """loss = window FM + lambda * L_MA(student over [t_{k+1}, t_k] from x_{t_k}, labels c)."""
    teacher = _teacher()
    cls = get_method("perflow")
    net = _Probe()
    m = cls(FlowMap(net, param), teacher,
            cls.make_config(num_windows=2, solver="euler", solve_steps=1, ma_weight=0.3, ma_batch=0, ma_mode=mode,
                            ma_substeps=2, ma_t_min=0.05))
    b = _batch()
    t_s, t_e, x_s, x_e, x_t, t, target = _two_window_targets(teacher, b)
    second = t if param == "velocity" else t_e
    fm = ((net(x_t, t, second, b.cond) - target) ** 2).mean()
    ma = ma_loss(m.student, teacher, x_s, t_s, t_e, b.cond, mode=mode, substeps=2, t_min=0.05).loss
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, fm + 0.3 * ma, rtol=1e-9, atol=1e-12)
    assert logs["loss_window"] == pytest.approx(float(fm), rel=1e-9)
    assert logs["ma"] == pytest.approx(float(ma), rel=1e-9)


def test_window_velocity_of_a_student_without_F() -> None:
    cls = get_method("perflow")
    st = _VelocityOnly()
    m = cls(st, _teacher(), cls.make_config())
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    cond = torch.tensor([0, 1, -1])
    torch.testing.assert_close(m.window_velocity(x, t, torch.zeros(3, dtype=torch.float64), cond),
                               st.velocity(x, t, cond))


def test_window_grid_values_and_refusals() -> None:
    torch.testing.assert_close(window_grid(), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(window_grid(1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(window_grid(2, []), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(window_grid(5, (1.0, 0.4, 0.0)), torch.tensor([1.0, 0.4, 0.0], dtype=torch.float64))
    assert window_grid(3).dtype == torch.float64
    with pytest.raises(ValueError, match=r"^num_windows must be >= 1; got 0$"):
        window_grid(0)
    with pytest.raises(ValueError, match=r"^PeRFlow windows must run from 1 to 0; got \[0\.9, 0\.5, 0\.0\]$"):
        window_grid(2, [0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"^PeRFlow windows must run from 1 to 0; got \[1\.0, 0\.5, 0\.1\]$"):
        window_grid(2, [1.0, 0.5, 0.1])


def test_window_targets_equation() -> None:
    x_s, x_e = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    t_s, t_e, u = torch.tensor([0.75, 1.0]), torch.tensor([0.5, 0.6]), torch.tensor([0.25, 0.5])
    x_t, t, v = window_targets(x_s, x_e, t_s, t_e, u)
    torch.testing.assert_close(t, torch.tensor([0.6875, 0.8]))
    torch.testing.assert_close(x_t, torch.tensor([[0.75, 1.75], [2.0, 0.0]]))
    torch.testing.assert_close(v, torch.tensor([[4.0, 4.0], [5.0, -5.0]]))


def test_config_refusals_by_message() -> None:
    cls = get_method("perflow")
    t = _teacher()

    def build(param: str = "velocity", **kw: object) -> object:
        return cls(FlowMap(_Probe(), param), t, cls.make_config(**kw))

    with pytest.raises(ValueError, match=r"^unknown window_input 'noise'; expected one of \('data', 'teacher'\)$"):
        build(window_input="noise")
    with pytest.raises(ValueError, match=r"^unknown PeRFlow solver 'dopri5'; expected one of "):
        build(solver="dopri5")
    for kw, got in (({"solve_steps": 0}, "0, 16"), ({"input_steps": 0}, "2, 0")):
        with pytest.raises(ValueError, match=rf"^solve_steps and input_steps must be >= 1; got {got}$"):
            build(**kw)
    build(solve_steps=1, input_steps=1)
    msg = (r"^perflow MA with a 'average_velocity' student aligns its window jumps: set ma_mode='jump' "
           r"\(ma_mode='ode' integrates an instantaneous velocity it is never trained on\)$")
    with pytest.raises(ValueError, match=msg):
        build("average_velocity", ma_weight=0.5, ma_mode="ode")
    build("average_velocity", ma_weight=0.5, ma_mode="jump")
    build("average_velocity", ma_weight=0.0, ma_mode="ode")
    build("velocity", ma_weight=0.5, ma_mode="ode")
    with pytest.raises(ValueError, match="ma_mode"):
        build(ma_mode="fisher")
    assert cls.uses_data(cls.make_config()) and not cls.uses_data(cls.make_config(window_input="teacher"))


def test_data_window_input_needs_data() -> None:
    cls = get_method("perflow")
    m = cls(FlowMap(_Probe(), "velocity"), _teacher(), cls.make_config())
    b = _batch()
    with pytest.raises(ValueError, match=r"^perflow with window_input='data' needs data batches \(x0\)$"):
        m.loss("student", Batch(x1=b.x1, u=b.u), 0)


def test_student_without_parameterization_is_a_velocity_student() -> None:
    """No ``parameterization`` attribute: treated as ``velocity``, so MA in ODE mode is accepted."""
    cls = get_method("perflow")
    m = cls(_Bare(), _teacher(), cls.make_config(ma_weight=0.5, ma_mode="ode"))
    assert m.config.ma_mode == "ode"


def test_window_choice_at_u_one_and_batch_dtype() -> None:
    """u = 1 (the closed end of U_SELECT) selects the last window; the window times take the batch's dtype."""
    cls = get_method("perflow")
    m = cls(FlowMap(_Probe(), "velocity"), _teacher(), cls.make_config(num_windows=4))
    b = _batch()
    b.u[:, U_SELECT] = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    _, t_s, t_e, _ = m.window_starts(b)
    assert float(t_s[-1]) == 0.25 and float(t_e[-1]) == 0.0
    assert float(t_s[0]) == 1.0 and float(t_e[0]) == 0.75
    b32 = Batch(x1=b.x1.float(), u=b.u.float(), x0=b.x0.float(), cond=b.cond)
    x_s, t_s, t_e, _ = m.window_starts(b32)
    assert t_s.dtype == t_e.dtype == x_s.dtype == torch.float32


@pytest.mark.parametrize("end_fraction", [0.0, 0.4, 1.0])
def test_in_window_second_time_is_the_equation(end_fraction: float) -> None:
    r"""``second_time="in_window"``: :math:`L = E\|F(x_t, t, s, c) - (x_s - x_e)/(t_s - t_e)\|^2` with
    :math:`s = t_e` on the rows with :math:`u_{aux} <` ``end_fraction`` (a tie u = f draws) and
    :math:`s = t_e + u_s (t - t_e)` on the others (every jump along the straight chord)."""
    teacher = _teacher()
    cls = get_method("perflow")
    net = _Probe()
    m = cls(FlowMap(net, "average_velocity"), teacher,
            cls.make_config(num_windows=2, solver="euler", solve_steps=1, second_time="in_window",
                            end_fraction=end_fraction))
    b = _batch()
    b.u[0, U_AUX] = 0.4  # a tie with end_fraction 0.4: the row draws s
    t_s, t_e, x_s, x_e, x_t, t, target = _two_window_targets(teacher, b)
    s = torch.where(b.u[:, U_AUX] < end_fraction, t_e, t_e + b.u[:, U_S] * (t - t_e))
    assert 0 < int((s == t_e).sum()) < N or end_fraction in (0.0, 1.0)
    expected = ((net(x_t, t, s, b.cond) - target) ** 2).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert logs["loss_window"] == pytest.approx(float(expected), rel=1e-9)


def test_second_time_and_end_fraction_refusals() -> None:
    cls = get_method("perflow")
    t = _teacher()

    def build(**kw: object) -> object:
        return cls(FlowMap(_Probe(), "average_velocity"), t, cls.make_config(**kw))

    with pytest.raises(ValueError, match=r"^unknown second_time 'end'; expected one of \('window_end', "
                                         r"'in_window'\)$"):
        build(second_time="end")
    for f in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^end_fraction must lie in \[0, 1\]; got {f}$"):
            build(end_fraction=f)
    for f in (0.0, 1.0):
        build(second_time="in_window", end_fraction=f)
