r"""Tests added to kill mutants of sampling/samplers.py (tools/mutation.py): every sampler step against its formula
on a recording field or flow map, the grid builders' values, and every refusal by its full message.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fewstep.sampling.samplers import (
    check_grid,
    gamma_sample,
    renoise,
    sample_flowmap,
    solve,
    solve_adaptive,
    time_grid,
)

torch.set_num_threads(1)
DT = torch.float64


class _Recorder:
    """A flow map f(x, t, s, c) = (1 - 0.5 (t - s)) x + 0.1 (t - s) c (c = 0 for None) recording its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def __call__(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        self.calls.append((t.clone(), s.clone(), cond))
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return (1 - 0.5 * (t - s))[:, None] * x + (0.1 * (t - s) * lab)[:, None]


class _Field:
    """A velocity field v(x, t) = -x + w t (+ c), recording its times and keyword arguments."""

    def __init__(self) -> None:
        self.times: list[Tensor] = []
        self.kwargs: list[dict] = []

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None, w: float = 1.0) -> Tensor:
        self.times.append(t.clone())
        self.kwargs.append({"cond": cond, "w": w})
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return -x + (w * t + lab)[:, None]


def _x(n: int = 3, dtype: torch.dtype = DT) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_time_grid_values_and_messages() -> None:
    def edm(n: int, ts: float, te: float, rho: float) -> Tensor:
        eta = lambda t: t / max(1 - t, 1e-3)  # noqa: E731
        lo, hi = eta(te) ** (1 / rho), eta(min(ts, 0.999)) ** (1 / rho)
        e = torch.tensor([(hi + i / n * (lo - hi)) ** rho for i in range(n + 1)], dtype=DT)
        g = e / (1 + e)
        g[0], g[-1] = ts, te
        return g

    for n, ts, te, rho in ((3, 1.0, 0.0, 7.0), (4, 0.9, 0.1, 3.0), (2, 1.0, 0.9995, 7.0)):
        torch.testing.assert_close(time_grid(n, ts, te, kind="edm", rho=rho), edm(n, ts, te, rho), rtol=1e-12,
                                   atol=1e-14)
    torch.testing.assert_close(time_grid(3, kind="edm"), edm(3, 1.0, 0.0, 7.0), rtol=1e-12, atol=1e-14)
    assert time_grid(1).tolist() == [1.0, 0.0] and time_grid(2).dtype == DT
    assert time_grid(2, 0.2).tolist() == [0.2, 0.1, 0.0]
    with pytest.raises(ValueError, match=r"^n_steps must be >= 1, got 0$"):
        time_grid(0)
    with pytest.raises(ValueError, match=r"^unknown grid kind 'karras'; expected 'uniform' or 'edm'$"):
        time_grid(3, kind="karras")
    with pytest.raises(ValueError, match=r"^a sampling grid must be strictly decreasing"):
        time_grid(3, 0.2, 0.8, kind="edm")


def test_check_grid_messages() -> None:
    cases = [
        ([1.0], "decreasing", r"^a time grid needs at least two points in a 1-D sequence; got shape \(1,\)$"),
        ([[1.0, 0.0]], "decreasing", r"^a time grid needs at least two points in a 1-D sequence; got shape \(1, 2\)$"),
        ([1.2, 0.0], "decreasing", r"^grid times must lie in \[0, 1\]; got \[0\.0, 1\.2\]$"),
        ([1.0, -0.1], "decreasing", r"^grid times must lie in \[0, 1\]; got \[-0\.1, 1\.0\]$"),
        ([0.0, 1.0], "decreasing",
         r"^a sampling grid must be strictly decreasing \(t=1 noise -> t=0 data\); got \[0\.0, 1\.0\]$"),
        ([1.0, 0.0], "increasing",
         r"^a likelihood grid must be strictly increasing \(t=0 data -> t=1 noise\); got \[1\.0, 0\.0\]$"),
        ([1.0, 0.2, 0.5], "monotone", r"^a time grid must be strictly monotone; got \[1\.0, 0\.2, 0\.5\]$"),
        ([1.0, 0.0], "up",
         r"^unknown grid order 'up'; expected one of \('decreasing', 'increasing', 'monotone'\)$"),
    ]
    for grid, order, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_grid(grid, order=order)
    assert check_grid([1.0, 0.0]).dtype == DT
    assert check_grid([0.0, 1.0], order="monotone").tolist() == [0.0, 1.0]
    assert check_grid([0.0, 1.0], "increasing").tolist() == [0.0, 1.0]
    assert check_grid([1.0, 0.0], "decreasing").tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_solve_is_euler_by_default_with_kwargs_and_trajectory(dtype: torch.dtype) -> None:
    f, x, cond = _Field(), _x(dtype=dtype), torch.tensor([0, 1, 2])
    res = solve(f, x, [1.0, 0.6, 0.0], cond=cond, w=2.0, return_trajectory=True)
    want, traj = x, [x]
    for t0, t1 in ((1.0, 0.6), (0.6, 0.0)):
        v = -want + (2.0 * t0 + cond.to(dtype))[:, None]
        want = want + (t1 - t0) * v
        traj.append(want)
    torch.testing.assert_close(res.x, want)
    assert res.nfe == 2 and res.times.tolist() == [1.0, 0.6, 0.0]
    assert res.trajectory is not None and len(res.trajectory) == 3
    for a, b in zip(res.trajectory, traj):
        torch.testing.assert_close(a, b)
    assert all(k == {"cond": cond, "w": 2.0} for k in f.kwargs)
    assert all(t.dtype == dtype and t.shape == (3,) for t in f.times)
    assert solve(_Field(), x, 2).times.tolist() == [1.0, 0.5, 0.0]
    assert solve(_Field(), x, 2).trajectory is None
    with pytest.raises(ValueError, match=r"^unknown ODE method 'midpoint'; expected one of \('euler', 'heun', 'rk4'\) "
                                         r"\(or use solve_adaptive\)$"):
        solve(f, x, 2, "midpoint")


def test_solve_adaptive_arguments() -> None:
    x = _x()
    cond = torch.tensor([0, 1, 2])
    f = _Field()
    res = solve_adaptive(f, x, 0.9, 0.2, cond=cond, w=0.0, rtol=1e-10, atol=1e-10)
    # dx/dt = -x + c  =>  x(t) = c + (x(0.9) - c) exp(-(t - 0.9))
    c = cond.to(DT)[:, None]
    torch.testing.assert_close(res.x, c + (x - c) * math.exp(0.7), rtol=1e-8, atol=1e-8)
    assert all(k == {"cond": cond, "w": 0.0} for k in f.kwargs)
    assert all(0.2 <= float(t.min()) and float(t.max()) <= 0.9 and t.shape == (3,) for t in f.times)
    assert res.times.tolist() == [0.9, 0.2] and res.trajectory is None and res.nfe == len(f.times)
    loose = solve_adaptive(_Field(), x, 0.9, 0.2, rtol=1e-2, atol=1e-2)
    default = solve_adaptive(_Field(), x, 0.9, 0.2)
    tight = solve_adaptive(_Field(), x, 0.9, 0.2, rtol=1e-6, atol=1e-6)
    assert loose.nfe < default.nfe == tight.nfe
    torch.testing.assert_close(default.x, tight.x, rtol=0, atol=0)
    assert solve_adaptive(_Field(), x, 0.9, 0.2, method="bosh3").nfe != default.nfe
    traj = solve_adaptive(_Field(), x, 0.0, 1.0, return_trajectory=True, n_save=5)
    assert traj.times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and len(traj.trajectory) == 5
    assert solve_adaptive(_Field(), x, return_trajectory=True).times.tolist() == [1.0, 0.0]
    assert solve_adaptive(_Field(), x, n_save=5).times.tolist() == [1.0, 0.0]
    for kw, msg in (({"t_start": 1.5}, r"^t_start must lie in \[0, 1\]; got 1\.5$"),
                    ({"t_end": -0.5}, r"^t_end must lie in \[0, 1\]; got -0\.5$")):
        with pytest.raises(ValueError, match=msg):
            solve_adaptive(_Field(), x, **kw)


def test_sample_flowmap_jumps_with_labels() -> None:
    f, x, cond = _Recorder(), _x(), torch.tensor([0, 1, 2])
    res = sample_flowmap(f, x, [1.0, 0.5, 0.2], cond=cond, return_trajectory=True)
    want = x
    for t, s in ((1.0, 0.5), (0.5, 0.2)):
        want = (1 - 0.5 * (t - s)) * want + (0.1 * (t - s) * cond.to(DT))[:, None]
    torch.testing.assert_close(res.x, want)
    assert res.nfe == 2 and len(res.trajectory) == 3 and res.times.tolist() == [1.0, 0.5, 0.2]
    assert [(c[0].tolist(), c[1].tolist()) for c in f.calls] == [([1.0] * 3, [0.5] * 3), ([0.5] * 3, [0.2] * 3)]
    assert all(c[2] is cond and c[0].dtype == DT for c in f.calls)
    one = _Recorder()
    res = sample_flowmap(one, x)
    assert res.nfe == 1 and res.trajectory is None and res.times.tolist() == [1.0, 0.0]
    assert one.calls[0][2] is None


def test_renoise_formula_and_message() -> None:
    x = _x()
    a = (1 - 0.8) / (1 - 0.3)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    got = renoise(x, 0.3, 0.8, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, a * x + math.sqrt(0.64 - (a * 0.3) ** 2) * z)
    torch.testing.assert_close(renoise(x, 0.4, 0.4), x)  # t = s: the identity (no noise)
    assert renoise(x.float(), 0.2, 0.5).dtype == torch.float32
    for s, t in ((0.8, 0.3), (1.0, 1.0)):
        with pytest.raises(ValueError, match=rf"^renoise needs 0 <= s <= t <= 1 and s < 1; got s={s}, t={t}$"):
            renoise(x, s, t)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_gamma_sample_steps(gamma: float) -> None:
    r"""Per step: jump t -> u with :math:`\eta_u = \sqrt{1-\gamma^2}\eta_{t'}` then re-noise u -> t' (not at t' = 0)."""
    grid = [1.0, 0.7, 0.3, 0.0]
    f, x, cond = _Recorder(), _x(), torch.tensor([0, 1, 2])
    res = gamma_sample(f, x, grid, gamma=gamma, cond=cond, generator=torch.Generator().manual_seed(9),
                       return_trajectory=True)
    g = torch.Generator().manual_seed(9)
    want, us = x, []
    for t, tn in zip(grid[:-1], grid[1:]):
        if tn > 0 and gamma > 0:
            eta = math.sqrt(1 - gamma**2) * tn / (1 - tn)
            u = eta / (1 + eta)
        else:
            u = tn
        us.append(u)
        want = (1 - 0.5 * (t - u)) * want + (0.1 * (t - u) * cond.to(DT))[:, None]
        if u < tn:
            want = renoise(want, u, tn, g)
    torch.testing.assert_close(res.x, want)
    assert [float(c[1][0]) for c in f.calls] == pytest.approx(us, abs=1e-15)
    assert [float(c[0][0]) for c in f.calls] == grid[:-1]
    assert all(c[2] is cond for c in f.calls)
    assert res.nfe == 3 and len(res.trajectory) == 4 and res.times.tolist() == grid
    if gamma == 1.0:
        assert us == [0.0, 0.0, 0.0]


def test_gamma_sample_defaults_and_refusals() -> None:
    x = _x()
    torch.testing.assert_close(gamma_sample(_Recorder(), x, 3).x, sample_flowmap(_Recorder(), x, 3).x)
    assert gamma_sample(_Recorder(), x, 2).times.tolist() == [1.0, 0.5, 0.0]
    assert gamma_sample(_Recorder(), x, 2).trajectory is None
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^gamma must lie in \[0, 1\]; got {bad}$"):
            gamma_sample(_Recorder(), x, 2, gamma=bad)


def test_grid_details() -> None:
    """End points are validated in float64 (a 1e-9 step is a valid grid); increasing means every step increases."""
    torch.testing.assert_close(time_grid(2, 1.0, 1.0 - 1e-9), torch.tensor([1.0, 1.0 - 5e-10, 1.0 - 1e-9], dtype=DT),
                               rtol=0, atol=1e-16)
    for order, msg in (("increasing", "strictly increasing"), ("monotone", "strictly monotone")):
        with pytest.raises(ValueError, match=msg):
            check_grid([0.0, 0.5, 0.3], order=order)


def test_solve_adaptive_uses_atol() -> None:
    x = _x()
    loose = solve_adaptive(_Field(), x, 0.9, 0.2, rtol=1e-2, atol=1e-2)
    tight = solve_adaptive(_Field(), x, 0.9, 0.2, rtol=1e-2, atol=1e-10)
    assert float((loose.x - tight.x).abs().max()) > 1e-4  # the absolute tolerance reaches the solver


def test_trajectories_hold_every_state() -> None:
    x, grid = _x(), [1.0, 0.6, 0.3, 0.0]
    for res in (sample_flowmap(_Recorder(), x, grid, return_trajectory=True),
                gamma_sample(_Recorder(), x, grid, gamma=0.5, generator=torch.Generator().manual_seed(0),
                             return_trajectory=True)):
        assert res.trajectory is not None and len(res.trajectory) == 4
        torch.testing.assert_close(res.trajectory[0], x)
        torch.testing.assert_close(res.trajectory[-1], res.x)
        assert all(s is not None and s.shape == x.shape for s in res.trajectory)
    step = sample_flowmap(_Recorder(), x, grid, return_trajectory=True).trajectory[1]
    torch.testing.assert_close(step, 0.8 * x)


def test_renoise_is_exactly_the_formula() -> None:
    x = _x()
    a = (1 - 0.8) / (1 - 0.3)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    want = a * x + math.sqrt(max(0.8 * 0.8 - (a * 0.3) ** 2, 0.0)) * z
    torch.testing.assert_close(renoise(x, 0.3, 0.8, torch.Generator().manual_seed(2)), want, rtol=0, atol=0)


def test_gamma_zero_is_deterministic_on_any_grid() -> None:
    """gamma = 0 never re-noises (no random draw), even where t/(1-t) round-trips below t (t' = 0.001)."""
    x, grid = _x(), [1.0, 0.5, 0.001, 0.0]
    torch.manual_seed(0)
    got = gamma_sample(_Recorder(), x, grid, gamma=0.0).x
    after = torch.rand(2)
    torch.testing.assert_close(got, sample_flowmap(_Recorder(), x, grid).x, rtol=0, atol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(2))
