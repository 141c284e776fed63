"""Tests of the probability paths: coefficients, exact conversions, CFG linearity, posterior means."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from fewstep.core.paths import CosinePath, GeneralAffinePath, LinearPath, cfg_combine, get_path
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)

TYPES = ("velocity", "x0", "noise", "score")


def _general_path(analytic: bool = False) -> GeneralAffinePath:
    r""":math:`\alpha = (1-t)^2`, :math:`\sigma = \sin(\pi t/2)` (optionally with analytic derivatives)."""
    alpha = lambda t: (1 - t) ** 2  # noqa: E731
    sigma = lambda t: torch.sin(0.5 * math.pi * t)  # noqa: E731
    if not analytic:
        return GeneralAffinePath(alpha, sigma)
    d_sigma = lambda t: 0.5 * math.pi * torch.cos(0.5 * math.pi * t)  # noqa: E731
    return GeneralAffinePath(alpha, sigma, lambda t: -2 * (1 - t), d_sigma)


PATHS = {"linear": LinearPath, "cosine": CosinePath, "general": _general_path}
SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(name=st.sampled_from(sorted(PATHS)), src=st.sampled_from(TYPES), dst=st.sampled_from(TYPES),
       seed=st.integers(0, 10_000), batch=st.integers(1, 6), t=st.floats(0.02, 0.98))
def test_conversion_round_trip(name: str, src: str, dst: str, seed: int, batch: int, t: float) -> None:
    path = PATHS[name]()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    pred = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    tt = torch.full((batch,), t, dtype=torch.float64)
    there = path.convert(pred, x, tt, src, dst)
    back = path.convert(there, x, tt, dst, src)
    assert torch.allclose(back, pred, rtol=1e-9, atol=1e-9)
    via_v = path.convert(path.convert(pred, x, tt, src, "velocity"), x, tt, "velocity", dst)
    assert torch.allclose(there, via_v, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(name=st.sampled_from(sorted(PATHS)), seed=st.integers(0, 10_000), t=st.floats(0.02, 0.98))
def test_conversions_of_a_conditional_pair(name: str, seed: int, t: float) -> None:
    r"""For one pair (x0, x1): x_t, dx_t from sample(); converting dx_t gives back x0, x1 and -x1/sigma."""
    path = PATHS[name]()
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    t = torch.full((4,), t, dtype=torch.float64)  # float64 times (a Python float is rounded by as_time)
    xt, v = path.sample(x0, x1, t)
    a, s, _, _ = (c[:, None] for c in path.coefficients(t))
    assert torch.allclose(xt, a * x0 + s * x1, rtol=1e-12, atol=1e-12)
    assert torch.allclose(path.convert(v, xt, t, "velocity", "x0"), x0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(path.convert(v, xt, t, "velocity", "noise"), x1, rtol=1e-9, atol=1e-9)
    assert torch.allclose(path.convert(v, xt, t, "velocity", "score"), -x1 / s, rtol=1e-8, atol=1e-8)
    h = 1e-6  # dx_t/dt by central differences
    fd = (path.sample(x0, x1, t + h)[0] - path.sample(x0, x1, t - h)[0]) / (2 * h)
    assert torch.allclose(v, fd, rtol=1e-7, atol=1e-7)


def test_linear_score_formula() -> None:
    """On the linear path: v = -(x + t s)/(1 - t)."""
    path = LinearPath()
    x, sc = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 0.9, 5, dtype=torch.float64)
    ref = -(x + t[:, None] * sc) / (1 - t[:, None])
    assert torch.allclose(path.score_to_velocity(sc, x, t), ref, rtol=1e-12, atol=1e-12)


def test_general_path_derivatives() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    auto, exact = _general_path().coefficients(t), _general_path(analytic=True).coefficients(t)
    for c_auto, c_exact in zip(auto, exact):
        assert torch.allclose(c_auto, c_exact, rtol=1e-12, atol=1e-12)
    lin = GeneralAffinePath(lambda u: 1 - u, lambda u: u)
    cos = GeneralAffinePath(lambda u: torch.cos(0.5 * math.pi * u), lambda u: torch.sin(0.5 * math.pi * u))
    for gen, ref in ((lin, LinearPath()), (cos, CosinePath())):
        for c_gen, c_ref in zip(gen.coefficients(t), ref.coefficients(t)):
            assert torch.allclose(c_gen, c_ref, rtol=1e-12, atol=1e-12)


def _posterior_x0(teacher, x: Tensor, t: float) -> Tensor:
    r""":math:`E[x_0|x_t] = \sum_k r_k(\mu_k + \alpha\Sigma_k C_k^{-1}(x - \alpha\mu_k))` with dense solves."""
    a, s, _, _ = teacher.path.coefficients(torch.tensor([t], dtype=torch.float64))
    d = teacher.dim
    C = a**2 * teacher.covariances + s**2 * torch.eye(d, dtype=torch.float64)
    logr = torch.stack([torch.distributions.MultivariateNormal(a * teacher.means[k], C[k]).log_prob(x)
                        for k in range(len(teacher.weights))], 1) + torch.log(teacher.weights)
    r = torch.softmax(logr, 1)
    delta = x[:, None, :] - a * teacher.means[None]
    sol = torch.linalg.solve(C[None], delta[..., None])[..., 0]
    post = teacher.means[None] + a * torch.einsum("kij,bkj->bki", teacher.covariances, sol)
    return (r[..., None] * post).sum(1)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("name", ["ring8", "aniso3"])
def test_teacher_x0_is_posterior_mean(name: str, path: str) -> None:
    teacher = load_preset(name, path=path)
    g = torch.Generator().manual_seed(0)
    for t in (0.1, 0.5, 0.9):
        x = teacher.sample(32, t=t, generator=g, dtype=torch.float64)
        ref = _posterior_x0(teacher, x, t)
        tt = torch.full((32,), t, dtype=torch.float64)
        assert torch.allclose(teacher.x0(x, tt), ref, rtol=1e-9, atol=1e-9)
        v = teacher.velocity(x, tt)
        assert torch.allclose(teacher.path.convert(v, x, tt, "velocity", "x0"), ref, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(name=st.sampled_from(sorted(PATHS)), dst=st.sampled_from(TYPES), w=st.floats(-1.0, 5.0),
       seed=st.integers(0, 10_000), t=st.floats(0.02, 0.98))
def test_cfg_commutes_with_conversion(name: str, dst: str, w: float, seed: int, t: float) -> None:
    path = PATHS[name]()
    g = torch.Generator().manual_seed(seed)
    x, v_u, v_c = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    lhs = path.convert(cfg_combine(v_u, v_c, w), x, t, "velocity", dst)
    rhs = cfg_combine(path.convert(v_u, x, t, "velocity", dst), path.convert(v_c, x, t, "velocity", dst), w)
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


def test_cfg_combine_values() -> None:
    u, c = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    assert torch.equal(cfg_combine(u, c, 0.0), u) and torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.allclose(cfg_combine(u, c, 2.0), torch.tensor([[5.0, -6.0]]))
    per_row = cfg_combine(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([2.0, 3.0]))
    assert torch.allclose(per_row, torch.tensor([[2.0, 2.0], [3.0, 3.0]]))


def test_path_errors() -> None:
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unknown prediction type 'eps'"):
        LinearPath().convert(x, x, 0.5, "eps", "velocity")
    with pytest.raises(ValueError, match="unknown path 'vp'"):
        get_path("vp")
    with pytest.raises(ValueError, match="alpha\\(0\\)=1"):
        GeneralAffinePath(lambda t: 1 - 0.5 * t, lambda t: t)
    with pytest.raises(ValueError, match="same shape"):
        LinearPath().sample(torch.zeros(2, 2), torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        LinearPath().sample(x, x, 1.2)
    assert isinstance(get_path("cosine"), CosinePath) and get_path(LinearPath()).name == "linear"
