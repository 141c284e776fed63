"""The one fixed-step Runge-Kutta integrator: tableaus, order of accuracy, augmented states, per-row times."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fewstep.sampling.integrators import RK_METHODS, TABLEAUS, ButcherTableau, get_tableau, rk_step
from fewstep.sampling.samplers import solve

torch.set_num_threads(1)


def _integrate(method: str | ButcherTableau, n: int, y0: Tensor, t0: float = 1.0, t1: float = 0.0) -> Tensor:
    """y(t1) of dy/dt = -y from y(t0) = y0 with n uniform steps."""
    y = y0
    for i in range(n):
        a, b = t0 + (t1 - t0) * i / n, t0 + (t1 - t0) * (i + 1) / n
        y = rk_step(lambda z, tau: -z, y, a, b, method)
    return y


@pytest.mark.parametrize("method", RK_METHODS)
def test_tableaus_are_consistent(method: str) -> None:
    tab = TABLEAUS[method]
    assert math.isclose(sum(tab.b), 1.0, rel_tol=0, abs_tol=1e-15)
    for j, row in enumerate(tab.a):  # explicit, and row sums equal the stage times
        assert len(row) == j
        assert math.isclose(sum(row), tab.c[j], rel_tol=0, abs_tol=1e-15)
    assert tab.stages == len(tab.weights)


@pytest.mark.parametrize("method", RK_METHODS)
def test_order_of_accuracy_on_linear_decay(method: str) -> None:
    """Global error on dy/dt = -y, y(1) = 1 integrated down to 0 (exact y(0) = e), shrinks as h^p."""
    y0 = torch.ones(1, 1, dtype=torch.float64)
    errs = [abs(float(_integrate(method, n, y0)) - math.e) for n in (8, 16, 32)]
    p = TABLEAUS[method].order
    for coarse, fine in zip(errs, errs[1:], strict=False):
        assert math.log2(coarse / fine) == pytest.approx(p, abs=0.15)
    # and forwards in time: y(1) = y(0) e^{-1}
    assert float(_integrate(method, 64, y0, 0.0, 1.0)) == pytest.approx(math.exp(-1), rel=20 * 64.0 ** -p)


@pytest.mark.parametrize("method", RK_METHODS)
def test_augmented_state_matches_separate_solves(method: str) -> None:
    """A tuple state (x, l) with dl/dt = -|x|^2 gives the same x as the plain solve and its own quadrature."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    rhs = lambda z, tau: -z * tau[:, None]  # noqa: E731
    x, ell = x0, torch.zeros(5, dtype=torch.float64)
    for a, b in ((1.0, 0.6), (0.6, 0.25), (0.25, 0.0)):
        x, ell = rk_step(lambda st, tau: (rhs(st[0], tau), -(st[0] ** 2).sum(1)), (x, ell), a, b, method)
    plain = solve(lambda z, tau: rhs(z, tau), x0, [1.0, 0.6, 0.25, 0.0], method).x
    assert torch.equal(x, plain)
    # exact: x(t) = x0 exp((1 - t^2) / 2), l(0) = int_0^1 |x(t)|^2 dt
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)
    sq = (x0**2).sum(1)[:, None] * torch.exp(1 - ts**2)[None]
    want = torch.trapezoid(sq, ts, dim=1)
    tol = {"euler": 0.5, "heun": 0.05, "rk4": 1e-3}[method]
    assert torch.allclose(ell, want, rtol=tol)
    assert not torch.allclose(ell, torch.zeros_like(ell))


@pytest.mark.parametrize("method", RK_METHODS)
def test_per_row_times_equal_scalar_times(method: str) -> None:
    """Per-row tensor times give, row by row, the scalar-time step (stage c = 1 lands exactly on s)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3], dtype=torch.float64)
    s = torch.tensor([0.0, 0.35, 0.45, 0.0], dtype=torch.float64)
    seen: list[Tensor] = []

    def fn(z: Tensor, tau: Tensor) -> Tensor:
        seen.append(tau)
        return torch.sin(3 * z) * tau[:, None]

    rows = rk_step(fn, x, t, s, method)
    assert len(seen) == TABLEAUS[method].stages
    if TABLEAUS[method].c[-1] == 1.0:
        assert torch.equal(seen[-1], s)
    for i in range(4):
        one = rk_step(lambda z, tau: torch.sin(3 * z) * tau[:, None], x[i:i + 1], float(t[i]), float(s[i]), method)
        assert torch.allclose(rows[i:i + 1], one, rtol=1e-15, atol=1e-15)


def test_errors_and_custom_tableau() -> None:
    with pytest.raises(ValueError, match="unknown ODE method 'midpoint'"):
        get_tableau("midpoint")
    with pytest.raises(ValueError, match="both Python floats or both per-row tensors"):
        rk_step(lambda z, tau: z, torch.ones(2, 1), 1.0, torch.zeros(2), "euler")
    midpoint = ButcherTableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0), 1.0)
    y0 = torch.ones(1, 1, dtype=torch.float64)
    errs = [abs(float(_integrate(midpoint, n, y0)) - math.e) for n in (16, 32)]
    assert math.log2(errs[0] / errs[1]) == pytest.approx(2, abs=0.15)
