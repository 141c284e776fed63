"""Tests of the samplers: orders of accuracy, exact NFE counts, flow-map and gamma sampling, grids."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from _core_helpers import assert_moments, mixture_moments
from fewstep.core.flowmap import FlowMap, VelocityFlowMap
from fewstep.networks.mlp import MLP
from fewstep.sampling.samplers import (
    check_grid,
    gamma_sample,
    renoise,
    sample_flowmap,
    solve,
    solve_adaptive,
    time_grid,
)
from fewstep.teachers import TeacherFlowMap
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _cov(theta: float, a: float, b: float) -> Tensor:
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([a * a, b * b], dtype=torch.float64)) @ rot.T


def smooth_teacher() -> GaussianMixtureTeacher:
    """Two broad rotated components: a smooth field, so fixed-step solvers reach their asymptotic order."""
    return GaussianMixtureTeacher([0.6, 0.4], [[1.0, 0.5], [-1.0, -0.5]],
                                  torch.stack([_cov(0.5, 0.8, 0.4), _cov(-0.7, 0.6, 0.5)]))


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[GaussianMixtureTeacher, Tensor, Tensor]:
    """Smooth teacher, 16 noise points (seed 0) and their 1024-step RK4 solve (error ~1e-12), computed once."""
    teacher = smooth_teacher()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return teacher, x, solve(teacher, x, 1024, "rk4").x


class CountingField:
    """A velocity field that counts its own batched calls (independent of the sampler's counter)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: Tensor, t: Tensor, **kw) -> Tensor:
        self.calls += 1
        return self.fn(x, t, **kw)


@pytest.mark.parametrize("method,order,steps", [("euler", 1, [8, 16, 32, 64]), ("heun", 2, [8, 16, 32, 64]),
                                                ("rk4", 4, [4, 8, 16, 32])])
def test_convergence_order(method: str, order: int, steps: list[int]) -> None:
    """Slope of log(max error) vs log(steps) against a 1024-step RK4 reference is -order within 0.3."""
    teacher, x, ref = _reference()
    errs = [float((solve(teacher, x, n, method).x - ref).abs().max()) for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.3, (errs, slope)


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_nfe_counts(method: str, per_step: int) -> None:
    teacher = load_preset("ring8")
    for n in (1, 3, 5):
        field = CountingField(teacher.velocity)
        res = solve(field, torch.randn(4, 2), n, method, return_trajectory=True)
        assert res.nfe == per_step * n == field.calls
        assert len(res.trajectory) == n + 1 and res.times.shape == (n + 1,)
    f = FlowMap(MLP(2, hidden=8, depth=1), "average_velocity")
    for n in (1, 2, 4):
        calls = []
        res = sample_flowmap(lambda x, t, s, cond=None: calls.append(1) or f(x, t, s, cond), torch.randn(3, 2), n)
        assert res.nfe == n == len(calls)
        res = gamma_sample(f, torch.randn(3, 2), n, gamma=0.5, generator=torch.Generator().manual_seed(0))
        assert res.nfe == n


def test_solve_adaptive_accuracy_and_directions() -> None:
    """dopri5 matches a fine RK4 solve, and integrating data->noise->data returns the start."""
    teacher, x, ref = _reference()
    res = solve_adaptive(teacher, x, rtol=1e-9, atol=1e-9, return_trajectory=True, n_save=5)
    assert torch.allclose(res.x, ref, rtol=1e-7, atol=1e-7)
    assert len(res.trajectory) == 5 and res.nfe > 0
    back = solve_adaptive(teacher, res.x, 0.0, 1.0, rtol=1e-9, atol=1e-9).x
    assert torch.allclose(back, x, rtol=1e-6, atol=1e-6)


def test_teacher_flowmap_sampling_equals_adaptive() -> None:
    teacher = load_preset("aniso3", conditional=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 2, generator=g, dtype=torch.float64)
    cond = torch.randint(-1, 3, (32,), generator=g)
    fm = TeacherFlowMap(teacher, rtol=1e-9, atol=1e-9, guidance=2.0)
    ref = solve_adaptive(teacher, x, rtol=1e-9, atol=1e-9, cond=cond, guidance=2.0).x
    for grid in (1, 4, [1.0, 0.7, 0.2, 0.0]):
        res = sample_flowmap(fm, x, grid, cond=cond)
        assert torch.allclose(res.x, ref, rtol=1e-6, atol=1e-6)
    one_step = sample_flowmap(VelocityFlowMap(lambda y, t, c: teacher.velocity(y, t, c)), x, 1, cond=cond).x
    assert torch.allclose(one_step, solve(teacher, x, 1, "euler", cond=cond).x, rtol=1e-12, atol=1e-12)


def test_gamma_sampling() -> None:
    torch.manual_seed(0)
    f = FlowMap(MLP(2, hidden=16, depth=2), "average_velocity").double()
    x = torch.randn(16, 2, dtype=torch.float64)
    grid = [1.0, 0.75, 0.5, 0.2, 0.0]
    with torch.no_grad():
        det = sample_flowmap(f, x, grid).x
        assert torch.equal(gamma_sample(f, x, grid, gamma=0.0).x, det)
        a = gamma_sample(f, x, grid, gamma=0.6, generator=torch.Generator().manual_seed(5)).x
        b = gamma_sample(f, x, grid, gamma=0.6, generator=torch.Generator().manual_seed(5)).x
        c = gamma_sample(f, x, grid, gamma=0.6, generator=torch.Generator().manual_seed(6)).x
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-3 and float((a - det).abs().max()) > 1e-3
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        gamma_sample(f, x, grid, gamma=1.5)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_gamma_sampling_with_exact_flowmap_is_exact(gamma: float) -> None:
    """With the exact flow map every jump lands on p_u and every re-noising on p_{t_{i+1}}: samples ~ p_0."""
    teacher = smooth_teacher()
    fm = TeacherFlowMap(teacher, rtol=1e-6, atol=1e-6)
    n = 4000
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = gamma_sample(fm, x, [1.0, 0.6, 0.3, 0.0], gamma=gamma, generator=torch.Generator().manual_seed(4)).x
    mean, cov = mixture_moments(teacher, 0.0)
    assert_moments(out, mean, cov, z=5.5)


def test_renoise_marginals() -> None:
    r"""Exact samples of p_s re-noised to t have the moments of p_t (forward kernel of the linear path)."""
    teacher = load_preset("aniso3")
    g = torch.Generator().manual_seed(7)
    xs = teacher.sample(20000, t=0.3, generator=g, dtype=torch.float64)
    xt = renoise(xs, 0.3, 0.8, generator=g)
    mean, cov = mixture_moments(teacher, 0.8)
    assert_moments(xt, mean, cov, z=5.5)
    with pytest.raises(ValueError, match="renoise needs"):
        renoise(xs, 0.8, 0.3)


def test_time_grids() -> None:
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    g = time_grid(6, kind="edm", rho=7.0)
    assert float(g[0]) == 1.0 and float(g[-1]) == 0.0 and bool((g[1:] < g[:-1]).all())
    eta = (g[1:-1] / (1 - g[1:-1])) ** (1 / 7)  # eta^(1/rho) is evenly spaced on the interior
    assert torch.allclose(eta[1:] - eta[:-1], (eta[1] - eta[0]).expand(len(eta) - 1), rtol=1e-9, atol=1e-12)
    assert torch.allclose(time_grid(2, 0.8, 0.2), torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64),
                          rtol=1e-12, atol=1e-12)


def test_bad_grids_and_arguments() -> None:
    v = load_preset("ring8").velocity
    x = torch.randn(2, 2)
    cases = [([0.0, 1.0], "strictly decreasing"), ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
             ([1.2, 0.0], r"\[0, 1\]"), ([1.0, -0.1], r"\[0, 1\]"), ([1.0], "at least two points"),
             ([[1.0, 0.0]], "at least two points")]
    for grid, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_grid(grid)
        with pytest.raises(ValueError, match=msg):
            solve(v, x, grid)
        with pytest.raises(ValueError, match=msg):
            sample_flowmap(VelocityFlowMap(lambda y, t, c: v(y, t, c)), x, grid)
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        time_grid(0)
    with pytest.raises(ValueError, match="unknown grid kind"):
        time_grid(3, kind="karras")
    with pytest.raises(ValueError, match="unknown ODE method 'midpoint'"):
        solve(v, x, 2, "midpoint")
    with pytest.raises(ValueError, match=r"t_start must lie in \[0, 1\]"):
        solve_adaptive(v, x, t_start=1.5)


def test_grid_orders_and_increasing_uniform_grid() -> None:
    """One validator for every direction; the one uniform builder also runs data -> noise."""
    assert torch.equal(time_grid(4, 0.0, 1.0), torch.linspace(0, 1, 5, dtype=torch.float64))
    assert torch.equal(check_grid([0.0, 0.5, 1.0], order="increasing"), torch.tensor([0.0, 0.5, 1.0],
                                                                                      dtype=torch.float64))
    assert check_grid([1.0, 0.0], order="monotone").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="strictly increasing"):
        check_grid([1.0, 0.0], order="increasing")
    with pytest.raises(ValueError, match="strictly monotone"):
        check_grid([1.0, 0.2, 0.5], order="monotone")
    with pytest.raises(ValueError, match="unknown grid order"):
        check_grid([1.0, 0.0], order="up")
    with pytest.raises(ValueError, match="strictly decreasing"):
        time_grid(3, 0.0, 1.0, kind="edm")
    with pytest.raises(ValueError, match="strictly monotone"):
        time_grid(3, 0.5, 0.5)


def test_sample_with_renoise_is_not_the_starting_noise() -> None:
    r"""Callers draw :math:`x_1` with ``seed``; sample_with's re-noising must not reuse that stream. For the identity
    map a 2-NFE gamma=1 sample is :math:`\tfrac12 x_1 + \tfrac12 z` (jump to t=0, re-noise to 1/2, jump), which
    equals the gamma=0 sample :math:`x_1` exactly when z is drawn from a generator seeded with ``seed``."""
    from fewstep.sampling.spec import SamplerSpec, sample_with

    def identity(x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x

    x1 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(3))
    det = sample_with(identity, x1, SamplerSpec(gamma=0.0), 2, seed=3).x
    sto = sample_with(identity, x1, SamplerSpec(gamma=1.0), 2, seed=3).x
    torch.testing.assert_close(det, x1)
    assert float((sto - det).abs().amin(dim=1).median()) > 0.05
    torch.testing.assert_close(sto.std(), torch.tensor(0.5**0.5), atol=0.03, rtol=0.0)  # independent halves
