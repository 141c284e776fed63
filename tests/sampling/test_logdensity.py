"""Log-densities along ODEs and flow-map jumps, checked against exact mixture densities and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep import MLP, FlowMap
from fewstep.sampling.logdensity import (
    divergence,
    flowmap_logdensity,
    jump_logdet,
    likelihood,
    make_probes,
    ode_logdensity,
    sample_with_logdensity,
    standard_normal_logprob,
)
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _noise(n: int, d: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("preset,steps", [("ring8", 100), ("aniso3", 40)])
def test_sampling_logdensity_matches_exact_mixture(preset: str, steps: int) -> None:
    teacher = load_preset(preset)
    x1 = _noise(128)
    res = sample_with_logdensity(teacher, x1, steps, method="rk4", divergence="exact")
    err = (res.log_q - teacher.log_prob(res.x, 0.0)).abs()
    assert res.nfe == 4 * steps
    assert float(err.mean()) <= 1e-4
    assert float(err.max()) <= 1e-3


def test_adaptive_logdensity_matches_exact_mixture() -> None:
    teacher = load_preset("aniso3")
    x1 = _noise(128, seed=1)
    res = ode_logdensity(teacher, x1, [1.0, 0.0], standard_normal_logprob(x1), method="dopri5", rtol=1e-7,
                         atol=1e-7)
    assert float((res.log_q - teacher.log_prob(res.x, 0.0)).abs().mean()) <= 1e-4
    assert res.nfe > 10


def test_logdensity_at_intermediate_time_matches_marginal() -> None:
    """From t=1 to t=0.5 the log-density is that of the exact marginal p_0.5."""
    teacher = load_preset("ring8")
    x1 = _noise(64, seed=2)
    res = sample_with_logdensity(teacher, x1, torch.linspace(1.0, 0.5, 41, dtype=torch.float64), method="rk4")
    assert float((res.log_q - teacher.log_prob(res.x, 0.5)).abs().max()) <= 1e-6  # RK4 error ~ h^4


def test_forward_and_reverse_logdensities_agree() -> None:
    teacher = load_preset("aniso3")
    x1 = _noise(64, seed=3)
    fwd = sample_with_logdensity(teacher, x1, 40, method="rk4")
    rev = likelihood(teacher, fwd.x, method="dopri5", rtol=1e-8, atol=1e-8)
    rev_fixed = likelihood(teacher, fwd.x, 40, method="rk4")
    assert float((rev.log_q - fwd.log_q).abs().max()) <= 1e-4
    assert float((rev.x - x1).abs().max()) <= 1e-4  # the reverse ODE returns to the starting noise
    assert float((rev_fixed.log_q - fwd.log_q).abs().max()) <= 1e-3


def test_linear_field_logdensity_is_gaussian() -> None:
    """v(x, t) = A x gives x_0 = exp(-A) x_1, so q_0 = N(0, e^{-A} e^{-A^T}); Euler/RK4 vs closed form."""
    a = torch.tensor([[0.3, 0.8], [-0.2, 0.5]], dtype=torch.float64)
    x1 = _noise(32, seed=4)
    res = sample_with_logdensity(lambda x, t: x @ a.T, x1, 50, method="rk4")
    m = torch.linalg.matrix_exp(-a)
    q0 = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), m @ m.T)
    assert torch.allclose(res.x, x1 @ m.T, atol=1e-9)
    assert torch.allclose(res.log_q, q0.log_prob(res.x), atol=1e-9)


def test_hutchinson_unbiased_against_exact() -> None:
    teacher = load_preset("aniso3")
    x = _noise(1, seed=5).expand(4000, 2).contiguous()  # one point, 4000 independent probes
    t = torch.full((4000,), 0.4, dtype=torch.float64)
    exact = divergence(teacher, x, t, method="exact")
    est = divergence(teacher, x, t, method="hutchinson", probes=make_probes(x, 1, torch.Generator().manual_seed(0)))
    se = float(est.std()) / math.sqrt(est.numel())
    assert abs(float(est.mean()) - float(exact[0])) <= 4 * se
    assert float(est.std()) > 0  # a single probe really is noisy here


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_variance_falls_as_one_over_k(kind: str) -> None:
    """v = A x: div = tr A; Rademacher variance of z^T A z is 1/2 sum_{i!=j} (A_ij + A_ji)^2."""
    d, n = 5, 4000
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.zeros(n, d, dtype=torch.float64)
    fn = lambda y, t: y @ a.T  # noqa: E731
    g = torch.Generator().manual_seed(1)
    e1 = divergence(fn, x, 0.5, "hutchinson", make_probes(x, 1, g, kind))
    e16 = divergence(fn, x, 0.5, "hutchinson", make_probes(x, 16, g, kind))
    s = a + a.T
    var_theory = 0.5 * float((s**2).sum() - (s.diag() ** 2).sum())
    if kind == "gaussian":
        var_theory = 0.5 * float((s**2).sum())  # Var(z^T A z) = 2 ||sym A||_F^2 for N(0, I)
    assert float(e1.var()) == pytest.approx(var_theory, rel=0.1)
    assert float(e1.var() / e16.var()) == pytest.approx(16.0, rel=0.15)
    assert abs(float(e16.mean()) - float(a.trace())) <= 4 * float(e16.std()) / math.sqrt(n)


def test_hutchinson_probes_fixed_along_path_and_logdensity_unbiased() -> None:
    teacher = load_preset("aniso3")
    x1 = _noise(1, seed=6).expand(2000, 2).contiguous()
    exact = sample_with_logdensity(teacher, x1[:1], 16, method="rk4")
    hut = sample_with_logdensity(teacher, x1, 16, method="rk4", divergence="hutchinson", num_probes=1,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hut.x, exact.x.expand(2000, 2), atol=1e-12)  # probes never change the trajectory
    se = float(hut.log_q.std()) / math.sqrt(2000)
    assert abs(float(hut.log_q.mean()) - float(exact.log_q[0])) <= 4 * se


def _linear_flowmap(a: Tensor):  # f_{t->s}(x) = x + (t - s) (A x) row-wise; det = det(I + (t-s) A)
    def f(x: Tensor, t, s, cond=None) -> Tensor:
        h = torch.as_tensor(t, dtype=x.dtype) - torch.as_tensor(s, dtype=x.dtype)
        h = h.reshape(-1, 1) if h.dim() == 1 else h
        return x + h * (x @ a.T)
    return f


def test_jump_logdet_linear_map_known_value() -> None:
    a = torch.tensor([[0.4, -1.1], [0.7, 0.2]], dtype=torch.float64)
    x = _noise(5, seed=7)
    y, ld = jump_logdet(_linear_flowmap(a), x, 1.0, 0.25)
    expect = torch.linalg.slogdet(torch.eye(2, dtype=torch.float64) + 0.75 * a)[1]
    assert torch.allclose(y, x + 0.75 * x @ a.T)
    assert torch.allclose(ld, expect.expand(5), atol=1e-12)


def test_jump_logdet_matches_explicit_jacobian_per_row_times() -> None:
    torch.manual_seed(0)
    f = FlowMap(MLP(3, hidden=16, depth=2, emb_dim=8), "average_velocity").double()
    x = _noise(6, d=3, seed=8)
    t = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.2], dtype=torch.float64)
    s = t * 0.4
    y, ld = jump_logdet(f, x, t, s)
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda z: f(z[None], t[i:i + 1], s[i:i + 1])[0], x[i])
        assert float(ld[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-10)
    assert torch.allclose(y, f(x, t, s))


def test_flowmap_logdensity_linear_chain_is_gaussian() -> None:
    a = torch.tensor([[0.4, -1.1], [0.7, 0.2]], dtype=torch.float64)
    x1 = _noise(10, seed=9)
    x, log_q = flowmap_logdensity(_linear_flowmap(a), x1, 3)
    m = torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) + a / 3, 3)
    q = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), m @ m.T)
    assert torch.allclose(x, x1 @ m.T, atol=1e-12)
    assert torch.allclose(log_q, q.log_prob(x), atol=1e-10)


class _Vel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t[:, None]], 1))


def _fd_check(loss_fn, param: Tensor, idx: tuple[int, ...], eps: float = 1e-6) -> tuple[float, float]:
    param.grad = None
    loss_fn().backward()
    g = float(param.grad[idx])
    with torch.no_grad():
        param[idx] += eps
        up = float(loss_fn())
        param[idx] -= 2 * eps
        dn = float(loss_fn())
        param[idx] += eps
    return g, (up - dn) / (2 * eps)


@pytest.mark.parametrize("div", ["exact", "hutchinson"])
def test_create_graph_gradient_matches_finite_differences(div: str) -> None:
    v = _Vel()
    x1 = _noise(16, seed=10)
    probes = make_probes(x1, 2, torch.Generator().manual_seed(0))

    def loss() -> Tensor:
        r = sample_with_logdensity(v, x1, 4, method="rk4", divergence=div, probes=probes, create_graph=True)
        return r.log_q.mean() + 0.3 * (r.x**2).mean()  # both d log q / d theta and d x_end / d theta

    for layer, idx in [(0, (0, 0)), (0, (3, 2)), (2, (1, 5))]:
        g, fd = _fd_check(loss, v.net[layer].weight, idx)
        assert g == pytest.approx(fd, rel=1e-5, abs=1e-8)
        assert abs(g) > 1e-6  # the parameter really matters


def test_flowmap_logdensity_create_graph_gradient() -> None:
    torch.manual_seed(0)
    f = FlowMap(MLP(2, hidden=16, depth=2, emb_dim=8), "average_velocity").double()
    x1 = _noise(8, seed=11)
    loss = lambda: flowmap_logdensity(f, x1, 2, create_graph=True).log_q.mean()  # noqa: E731
    p = next(f.parameters())
    g, fd = _fd_check(loss, p, (1, 0))
    assert g == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_bad_inputs_raise_clear_errors() -> None:
    x = _noise(4)
    with pytest.raises(ValueError, match="probes"):
        divergence(lambda y, t: y, x, 0.5, "hutchinson")
    with pytest.raises(ValueError, match="probes must have shape"):
        divergence(lambda y, t: y, x, 0.5, "hutchinson", probes=torch.ones(2, 3, 2))
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(lambda y, t: y, x, 0.5, "trace")
    with pytest.raises(ValueError, match="monotone"):
        ode_logdensity(lambda y, t: y, x, [1.0, 0.2, 0.5], torch.zeros(4))
    with pytest.raises(ValueError, match="log_p_start"):
        ode_logdensity(lambda y, t: y, x, [1.0, 0.0], torch.zeros(3))
    with pytest.raises(ValueError, match="unknown ODE method"):
        ode_logdensity(lambda y, t: y, x, [1.0, 0.0], torch.zeros(4), method="leapfrog")
    with pytest.raises(ValueError, match="increasing grid"):
        likelihood(lambda y, t: y, x, [1.0, 0.0], method="rk4")
    with pytest.raises(ValueError, match="probe kind"):
        make_probes(x, 2, kind="sphere")
