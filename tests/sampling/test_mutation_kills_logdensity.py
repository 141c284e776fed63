r"""Tests added to kill mutants of sampling/logdensity.py (tools/mutation.py): probes, the divergence's time argument
and defaults, and every refusal by its full message.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fewstep.sampling.logdensity import divergence, likelihood, make_probes, ode_logdensity

torch.set_num_threads(1)
DT = torch.float64
A = torch.tensor([[0.9, 0.3], [-0.2, 0.6]], dtype=DT)


class _Field:
    """v(x, t) = A x + t (affine, divergence tr A), recording the time tensors it is called with."""

    def __init__(self, param: Tensor | None = None) -> None:
        self.times: list[Tensor] = []
        self.param = param

    def __call__(self, x: Tensor, t: Tensor, **kw: object) -> Tensor:
        self.times.append(t)
        a = A.to(x.dtype) if self.param is None else self.param * A.to(x.dtype)
        return x @ a.T + t[:, None]


def _x(n: int = 3, dtype: torch.dtype = DT) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_make_probes_values_dtype_and_generator() -> None:
    x = _x(dtype=torch.float32)
    z = make_probes(x, 4, torch.Generator().manual_seed(3))
    want = torch.randint(0, 2, (4, 3, 2), generator=torch.Generator().manual_seed(3)).to(DT) * 2 - 1
    assert z.dtype == torch.float32 and z.shape == (4, 3, 2)
    torch.testing.assert_close(z, want.float(), rtol=0, atol=0)
    zg = make_probes(_x(), 2, torch.Generator().manual_seed(5), kind="gaussian")
    torch.testing.assert_close(zg, torch.randn((2, 3, 2), generator=torch.Generator().manual_seed(5), dtype=DT),
                               rtol=0, atol=0)
    assert make_probes(x, 2, kind="gaussian").dtype == torch.float32
    with pytest.raises(ValueError, match=r"^number of probes k must be >= 1, got 0$"):
        make_probes(x, 0)
    with pytest.raises(ValueError, match=r"^unknown probe kind 'sphere'; expected 'rademacher' or 'gaussian'$"):
        make_probes(x, 1, kind="sphere")


def test_probe_refusals_by_message() -> None:
    x = _x()
    with pytest.raises(ValueError, match=r"^method='hutchinson' needs probes of shape \(K, \*x\.shape\); build them "
                                         r"with make_probes$"):
        divergence(_Field(), x, 0.5, method="hutchinson")
    with pytest.raises(ValueError, match=r"^probes must have shape \(K, 3, 2\); got \(2, 3, 3\)$"):
        divergence(_Field(), x, 0.5, method="hutchinson", probes=torch.ones(2, 3, 3, dtype=DT))


@pytest.mark.parametrize("n", [3, 5])
def test_divergence_defaults_and_time_argument(n: int) -> None:
    """Default: exact, no graph; a scalar t becomes a (batch,) tensor in x's dtype."""
    x, f = _x(n), _Field()
    div = divergence(f, x, 0.5)
    torch.testing.assert_close(div, torch.full((n,), float(torch.trace(A)), dtype=DT))
    assert f.times[-1].shape == (n,) and f.times[-1].dtype == DT
    assert f.times[-1].tolist() == [0.5] * n
    p = torch.tensor(2.0, dtype=DT, requires_grad=True)
    assert not divergence(_Field(p), x, 0.5).requires_grad
    assert divergence(_Field(p), x, 0.5, create_graph=True).requires_grad
    tv = torch.linspace(0.1, 0.9, n, dtype=torch.float32)
    g = _Field()
    divergence(g, x, tv)
    assert g.times[-1].dtype == DT and g.times[-1].shape == (n,)


def test_likelihood_defaults_and_grid_refusals() -> None:
    x = _x()
    res = likelihood(_Field(), x)  # adaptive dopri5 over [0, 1] by default
    assert res.times.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"^method 'euler' needs a grid \(or an int number of steps\)$"):
        likelihood(_Field(), x, method="euler")
    with pytest.raises(ValueError, match=r"^likelihood needs an increasing grid ending at t=1 \(noise\); "
                                         r"got \[0\.0, 0\.5\]$"):
        likelihood(_Field(), x, [0.0, 0.5], method="euler")
    with pytest.raises(ValueError, match=r"^likelihood needs an increasing grid ending at t=1 \(noise\); "
                                         r"got \[1\.0, 0\.5, 0\.0\]$"):
        likelihood(_Field(), x, [1.0, 0.5, 0.0], method="euler")
    ode_logdensity(_Field(), x, [1.0, 0.0], torch.zeros(3, dtype=DT))


def test_ode_logdensity_defaults() -> None:
    """Defaults: rk4 (4 NFE per step), exact divergence, no graph, no trajectory, adaptive tolerances 1e-5."""
    x, lp = _x(), torch.zeros(3, dtype=DT)
    res = ode_logdensity(_Field(), x, [1.0, 0.5, 0.0], lp)
    ref = ode_logdensity(_Field(), x, [1.0, 0.5, 0.0], lp, method="rk4", divergence="exact")
    assert res.nfe == 8 and res.trajectory is None and res.log_q_trajectory is None
    torch.testing.assert_close(res.log_q, ref.log_q, rtol=0, atol=0)
    torch.testing.assert_close(res.log_q, torch.full((3,), float(torch.trace(A)), dtype=DT))  # -int_1^0 tr A dt
    p = torch.tensor(2.0, dtype=DT, requires_grad=True)
    assert not ode_logdensity(_Field(p), x, [1.0, 0.0], lp).log_q.requires_grad
    ada = ode_logdensity(_Field(), x, [1.0, 0.0], lp, method="dopri5")
    ada_ref = ode_logdensity(_Field(), x, [1.0, 0.0], lp, method="dopri5", rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ada.x, ada_ref.x, rtol=0, atol=0)
    assert ada.nfe == ada_ref.nfe
    f = _Field()
    ode_logdensity(f, x, [1.0, 0.0], lp, method="dopri5")
    assert all(t.dtype == DT and t.shape == (3,) for t in f.times)


def test_ode_logdensity_start_in_float64_and_probes_from_the_generator() -> None:
    x = _x()
    res = ode_logdensity(_Field(), x, [1.0, 0.0], [0.1, 0.2, 0.3], method="euler", return_trajectory=True)
    torch.testing.assert_close(res.log_q_trajectory[0], torch.tensor([0.1, 0.2, 0.3], dtype=DT), rtol=0, atol=0)
    kw = dict(method="euler", divergence="hutchinson")
    got = ode_logdensity(_Field(), x, [1.0, 0.0], torch.zeros(3, dtype=DT), generator=torch.Generator().manual_seed(1),
                         **kw)
    ref = ode_logdensity(_Field(), x, [1.0, 0.0], torch.zeros(3, dtype=DT),
                         probes=make_probes(x, 1, torch.Generator().manual_seed(1)), **kw)
    torch.testing.assert_close(got.log_q, ref.log_q, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^log_p_start must have shape \(3,\); got \(2,\)$"):
        ode_logdensity(_Field(), x, [1.0, 0.0], torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match=r"^unknown divergence method 'trace'; expected one of "
                                         r"\('exact', 'hutchinson'\)$"):
        ode_logdensity(_Field(), x, [1.0, 0.0], torch.zeros(3, dtype=DT), divergence="trace")


def test_likelihood_fixed_step_and_trajectory() -> None:
    """log q(x0) = log N(x1) + int div; its trajectory is log q of the path points (ends: input, log N(x1))."""
    from fewstep.core.utils import standard_normal_logprob

    x = _x()
    res = likelihood(_Field(), x, 4, method="euler", return_trajectory=True)
    assert res.nfe == 4
    torch.testing.assert_close(res.log_q, standard_normal_logprob(res.x) + float(torch.trace(A)))
    torch.testing.assert_close(res.log_q_trajectory[0], res.log_q)
    torch.testing.assert_close(res.log_q_trajectory[-1], standard_normal_logprob(res.x))


def test_sample_with_logdensity_defaults_and_refusals() -> None:
    from fewstep.sampling.logdensity import sample_with_logdensity

    res = sample_with_logdensity(_Field(), _x())
    assert res.times.numel() == 33 and res.nfe == 32 * 4
    for grid in ([0.9, 0.0], [0.0, 1.0]):
        with pytest.raises(ValueError, match=rf"^sampling needs a decreasing grid starting at t=1 \(noise\); "
                                             rf"got \[{grid[0]}, {grid[1]}\]$"):
            sample_with_logdensity(_Field(), _x(), grid)


def test_ode_logdensity_trajectory_kwargs_and_adaptive_ends() -> None:
    x, lp = _x(), torch.zeros(3, dtype=DT)
    res = ode_logdensity(_Field(), x, [1.0, 0.5, 0.0], lp, method="euler", return_trajectory=True)
    assert res.times.tolist() == [1.0, 0.5, 0.0]
    assert res.trajectory is not None and len(res.trajectory) == 3 and len(res.log_q_trajectory) == 3
    torch.testing.assert_close(res.trajectory[0], x)
    torch.testing.assert_close(res.trajectory[-1], res.x)
    torch.testing.assert_close(res.log_q_trajectory[-1], res.log_q)

    def shifted(y: Tensor, t: Tensor, shift: float = 0.0) -> Tensor:
        return -y + shift

    a = ode_logdensity(shifted, x, [1.0, 0.0], lp, method="euler", shift=2.0)
    torch.testing.assert_close(a.x, x + (0.0 - 1.0) * (-x + 2.0))  # one Euler step x + (t1 - t0) v(x, t0)
    ada = ode_logdensity(shifted, x, [1.0, 0.5, 0.0], lp, method="dopri5", rtol=1e-12, atol=1e-12)
    assert ada.times.tolist() == [1.0, 0.0]
    torch.testing.assert_close(ada.x, x * torch.e, rtol=1e-9, atol=1e-10)  # dx/dt = -x from 1 to 0
    torch.testing.assert_close(ada.log_q, torch.full((3,), -2.0, dtype=DT), rtol=1e-9, atol=1e-10)
    mid = ode_logdensity(shifted, x, [0.9, 0.3], lp, method="dopri5", rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mid.x, x * torch.exp(torch.tensor(0.6, dtype=DT)), rtol=1e-10, atol=1e-11)
    one = ode_logdensity(shifted, x[:1], [1.0, 0.0], lp[:1], method="dopri5")
    assert one.x.shape == (1, 2)


def test_velocity_shape_refused_and_unused_input_has_zero_divergence() -> None:
    x = _x()
    with pytest.raises(ValueError, match=r"^velocity must have the shape of x \(3, 2\); got \(3, 1\)$"):
        divergence(lambda y, t: y[:, :1], x, 0.5)
    p = torch.tensor(1.5, dtype=DT, requires_grad=True)

    def free(y: Tensor, t: Tensor) -> Tensor:  # depends on a parameter, not on y
        return (p * t)[:, None].expand(-1, 2)

    for kw in ({}, {"method": "hutchinson", "probes": make_probes(x, 2, torch.Generator().manual_seed(0))}):
        div = divergence(free, x, 0.5, **kw)
        assert div.shape == (3,) and div.dtype == DT and div.abs().max() == 0


def test_divergence_dtype_whatever_the_default() -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = _x().float()
        for kw in ({}, {"method": "hutchinson", "probes": make_probes(x, 2, torch.Generator().manual_seed(0))}):
            assert divergence(_Field(), x, 0.5, **kw).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


def test_adaptive_tolerances_reach_the_solver() -> None:
    x, lp = _x(), torch.zeros(3, dtype=DT)

    def run(rtol: float, atol: float) -> Tensor:
        return ode_logdensity(_Field(), x, [1.0, 0.0], lp, method="dopri5", rtol=rtol, atol=atol).x

    loose = run(1e-2, 1e-2)
    assert float((loose - run(1e-2, 1e-10)).abs().max()) > 1e-6
    assert float((loose - run(1e-10, 1e-2)).abs().max()) > 1e-6
    res = ode_logdensity(_Field(), x.float(), [1.0, 0.0], lp.float(), method="dopri5")
    assert res.times.dtype == DT and res.times.tolist() == [1.0, 0.0]
