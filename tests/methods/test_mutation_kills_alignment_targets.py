r"""Tests added to kill mutants of methods/_shared/alignment.py (tools/mutation.py), part 2: the window-end targets.

:math:`\tilde s(x) = c\,s_T(c x, \max(t_e, \varepsilon) \mid y; w)` with :math:`c = \alpha_\varepsilon/\alpha_{t_e}`
below :math:`\varepsilon` (1 above), on a linear-path and a cosine-path teacher and on a teacher with no ``path``
(the linear path is assumed); the KL estimate :math:`E[\log p_{t_s}(x) + \Delta - \log\tilde p_{t_e}(x_{end})]`;
the estimator choice and the window's defaults.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.paths import LinearPath
from fewstep.methods._shared.alignment import (
    end_log_prob,
    end_score,
    ma_loss,
    resolve_mode,
    teacher_score,
    window_logdensity,
)
from fewstep.sampling.logdensity import make_probes
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
DT = torch.float64
A0 = torch.tensor([[0.9, 0.3], [-0.2, 0.6]], dtype=DT)
B0 = torch.tensor([0.4, -0.1], dtype=DT)
COND = torch.tensor([0, 1, 1, 0, -1, 1])


class _Affine(nn.Module):
    """u(x, t) = A x + b in the input's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return x @ self.a.T.to(x.dtype) + self.b.to(x.dtype)


class _NoPath:
    """A teacher given only by its velocity (no ``path`` attribute), computing in float64 whatever the input."""

    def __init__(self, inner: GaussianMixtureTeacher) -> None:
        self.inner = inner

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        return self.inner.velocity(x.double(), t.double(), cond, guidance)

    def log_prob(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.inner.log_prob(x.double(), t, cond).double()


def _teacher(path: str = "linear") -> GaussianMixtureTeacher:
    cov = torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.3, 0.0], [0.0, 0.4]]], dtype=DT)
    return GaussianMixtureTeacher([0.5, 0.5], [[1.0, -0.5], [-1.5, 1.0]], cov, classes=[0, 1], path=path)


def _x(n: int = 6, seed: int = 0, dtype: torch.dtype = DT) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_end_score_formula(path: str, guidance: float) -> None:
    t, x, eps = _teacher(path), _x(), 0.05
    alpha = (lambda s: 1 - s) if path == "linear" else (lambda s: math.cos(math.pi * s / 2))
    for te_val in (0.0, 0.01, 0.3):
        te = torch.full((6,), te_val, dtype=DT)
        c = alpha(eps) / alpha(te_val) if te_val < eps else 1.0
        tq = torch.full((6,), max(te_val, eps), dtype=DT)
        want = c * t.score(c * x, tq, COND, guidance)
        torch.testing.assert_close(end_score(t, x, te, eps, COND, guidance), want, rtol=1e-10, atol=1e-12)
    zero = torch.zeros(6, dtype=DT)
    torch.testing.assert_close(end_score(t, x, zero, eps, COND), end_score(t, x, zero, eps, COND, 1.0))
    assert float((end_score(t, x, zero, eps, COND) - end_score(t, x, zero, eps)).abs().max()) > 1e-2


def test_teacher_without_path_is_on_the_linear_path() -> None:
    t, x, eps = _teacher(), _x(), 0.05
    for te_val in (0.0, 0.3):
        te = torch.full((6,), te_val, dtype=DT)
        torch.testing.assert_close(end_score(_NoPath(t), x, te, eps, COND), end_score(t, x, te, eps, COND))
    tt = torch.full((6,), 0.4, dtype=DT)
    torch.testing.assert_close(teacher_score(_NoPath(t), x, tt, COND), t.score(x, tt, COND))
    assert teacher_score(_NoPath(t), x.float(), tt.float(), COND).dtype == torch.float32  # in the input's dtype


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_teacher_score_formula_and_dtype(path: str) -> None:
    t, x, tt = _teacher(path), _x(), torch.full((6,), 0.4, dtype=DT)
    torch.testing.assert_close(teacher_score(t, x, tt, COND), t.score(x, tt, COND))
    torch.testing.assert_close(teacher_score(t, x, tt, COND, 2.0), t.score(x, tt, COND, 2.0))
    assert float((teacher_score(t, x, tt, COND, 2.0) - teacher_score(t, x, tt, COND)).abs().max()) > 1e-2
    assert float((teacher_score(t, x, tt, COND) - teacher_score(t, x, tt)).abs().max()) > 1e-2
    assert teacher_score(t, x.float(), tt.float(), COND).dtype == torch.float32
    if path == "cosine":
        lin = LinearPath().velocity_to_score(t.velocity(x, tt, COND), x, tt)
        assert float((teacher_score(t, x, tt, COND) - lin).abs().max()) > 1e-2


def test_zero_end_needs_positive_t_min() -> None:
    with pytest.raises(ValueError, match=r"^a window ending at t=0 needs ma_t_min > 0 \(the teacher score is "
                                         r"singular at t=0\)$"):
        end_score(_teacher(), _x(), torch.zeros(6, dtype=DT), 0.0)


def test_kl_is_the_window_log_density_difference() -> None:
    t, x = _teacher(), _x()
    res = ma_loss(_Affine(), t, x, 0.8, 0.0, COND, mode="exact", substeps=2, t_min=0.05)
    ts, te = torch.full((6,), 0.8, dtype=DT), torch.zeros(6, dtype=DT)
    want = (t.log_prob(x, ts, COND) + res.delta - end_log_prob(t, res.x_end, te, 0.05, COND)).mean()
    torch.testing.assert_close(res.kl, want.detach())
    assert ma_loss(_Affine(), t, x, 0.8, 0.0, COND, mode="exact", t_min=0.05, compute_kl=False).kl is None
    res32 = ma_loss(_Affine(), _NoPath(t), x.float(), 0.8, 0.2, COND, mode="exact")
    assert res32.kl is not None and res32.kl.dtype == torch.float32


def test_estimator_choice() -> None:
    assert resolve_mode("ode", _x(1)) == "exact"
    assert ma_loss(_Affine(), _teacher(), _x(1), 0.8, 0.3).mode == "exact"  # one row
    assert resolve_mode("ode", _x(), exact_dim=2) == "exact"  # exactly exact_dim entries
    assert resolve_mode("ode", _x(), exact_dim=1) == "hutchinson"
    assert resolve_mode("jump", _x(), exact_dim=1) == "jump"
    assert resolve_mode("ode", torch.zeros(3, 17)) == "hutchinson"
    assert resolve_mode("ode", torch.zeros(3, 16)) == "exact"


def test_window_defaults_and_solver_message() -> None:
    x, ts, te = _x(), torch.full((6,), 0.8, dtype=DT), torch.full((6,), 0.3, dtype=DT)
    got = window_logdensity(_Affine(), x, ts, te)
    ref = window_logdensity(_Affine(), x, ts, te, mode="exact", substeps=4, solver="rk4")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    z = make_probes(x, 2, torch.Generator().manual_seed(1))
    _, delta = window_logdensity(_Affine(), x, ts, te, mode="ode", exact_dim=1, probes=z, solver="euler")
    torch.testing.assert_close(delta, 0.5 * torch.einsum("kbi,ij,kbj->b", z, A0, z) / 2)
    with pytest.raises(ValueError, match=r"^unknown MA solver 'midpoint'; expected one of "
                                         r"\('euler', 'heun', 'rk4'\)$"):
        window_logdensity(_Affine(), x, ts, te, solver="midpoint")
