"""Density-free KL/TV estimators against closed-form Gaussian values, and the refusal of folded densities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fewstep.evaluation.divergences import (
    cov_kl_tv,
    histogram_tv,
    importance_weight_check,
    knn_kl,
    knn_kl_exact,
    knn_tv,
)
from fewstep.evaluation.valid_kl import density_free_kl_tv, valid_kl_tv

torch.set_num_threads(1)


def _gauss(n: int, d: int, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> Tensor:
    x = std * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 0] += mean
    return x


def _kl_iso(d: int, mean: float, std: float) -> float:
    """KL(N(m e_1, s^2 I) || N(0, I)) = (d s^2 + m^2 - d - 2 d log s) / 2."""
    return 0.5 * (d * std**2 + mean**2 - d - 2 * d * math.log(std))


@pytest.mark.parametrize("d,mean,std", [(2, 0.0, 1.0), (2, 1.0, 1.0), (2, 2.0, 1.0), (2, 0.0, 0.5), (3, 1.0, 0.7)])
def test_knn_kl_matches_closed_form(d: int, mean: float, std: float) -> None:
    x, y = _gauss(2000, d, mean, std, seed=1), _gauss(20000, d, seed=2)
    truth = _kl_iso(d, mean, std)
    log_p = -0.5 * (x**2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    for est in (knn_kl(x, y), knn_kl_exact(x, log_p)):
        assert est["kl_se"] < 0.06
        assert abs(est["kl"] - truth) < 0.05 + 3 * est["kl_se"], (est, truth)


@pytest.mark.parametrize("mean", [1.0, 2.0, 3.0])
def test_tv_estimators_match_closed_form_mean_shift(mean: float) -> None:
    """TV(N(m e_1, I), N(0, I)) = 2 Phi(m/2) - 1 in any dimension."""
    x, y = _gauss(2000, 2, mean, seed=3), _gauss(20000, 2, seed=4)
    truth = math.erf(mean / (2 * math.sqrt(2)))
    log_p = -0.5 * (x**2).sum(1) - math.log(2 * math.pi)
    for est in (knn_tv(x, y), knn_tv(x, log_p=log_p), histogram_tv(x, y)):
        assert abs(est["tv"] - truth) < 0.03 + 3 * est["tv_se"], (est, truth)


def test_tv_estimators_scale_change_and_floor() -> None:
    """TV(N(0, s^2 I_2), N(0, I_2)) = exp(-r2/2) - exp(-r2/(2 s^2)) with r2 = 4 log(1/s) s^2 / (1 - s^2)."""
    s = 0.5
    r2 = 4 * math.log(1 / s) * s**2 / (1 - s**2)
    truth = math.exp(-r2 / 2) - math.exp(-r2 / (2 * s**2))
    x, y = _gauss(2000, 2, std=s, seed=5), _gauss(20000, 2, seed=6)
    assert abs(knn_tv(x, y)["tv"] - truth) < 0.04
    floor = _gauss(2000, 2, seed=7)
    for kw in ({"reference": y}, {"log_p_fn": lambda z: -0.5 * (z**2).sum(1) - math.log(2 * math.pi)}):
        out = density_free_kl_tv(x, floor=floor, **kw)
        assert out["tv_knn_floor"] < 0.15 < out["tv_knn"], kw  # the noise floor of a perfect sampler is far below
        assert abs(out["tv_knn"] - truth) < 0.04
        assert abs(out["kl_knn_floor"]) < 0.05 and out["kl_knn"] == pytest.approx(_kl_iso(2, 0.0, s), abs=0.08)


def test_importance_weights_of_a_valid_density_average_at_most_one() -> None:
    q = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.5)
    x = q.sample((20000,))
    p = torch.distributions.Normal(torch.tensor(1.0, dtype=torch.float64), 0.6)
    chk = importance_weight_check(q.log_prob(x), p.log_prob(x))
    assert abs(chk["w_mean"] - 1) < 4 * chk["w_se"] and chk["w_ok"] == 1.0
    # a q that misses half of p's support: E_q[p/q] = 1/2
    half = x.abs()
    chk = importance_weight_check(math.log(2) + q.log_prob(half), torch.distributions.Normal(0.0, 1.5).log_prob(half))
    assert chk["w_mean"] == pytest.approx(0.5) and chk["w_ok"] == 1.0
    # a claimed log q half the true density (what a two-to-one fold gives): E = 2, check fails
    chk = importance_weight_check(q.log_prob(x) - math.log(2), q.log_prob(x))
    assert chk["w_mean"] == pytest.approx(2.0) and chk["w_ok"] == 0.0


def test_cov_refused_and_bad_inputs() -> None:
    lq = torch.zeros(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"folds .* on 0\.1% of samples"):
        cov_kl_tv(lq, lq, 0.001)
    assert cov_kl_tv(lq, lq, 0.001, fold_tol=0.01)["kl"] == 0.0
    with pytest.raises(ValueError, match="same dimension"):
        knn_kl(_gauss(10, 2), _gauss(10, 3))
    with pytest.raises(ValueError, match="k must satisfy"):
        knn_kl(_gauss(5, 2), _gauss(10, 2), k=5)
    with pytest.raises(ValueError, match="NaN"):
        knn_tv(torch.full((4, 2), math.nan), _gauss(10, 2), k=2)
    with pytest.raises(ValueError, match="dimension <= 3"):
        histogram_tv(_gauss(10, 4), _gauss(10, 4))
    with pytest.raises(ValueError, match="log_p_fn"):
        valid_kl_tv(_gauss(10, 2), lq, None)
    with pytest.raises(ValueError, match="exact target log_p_fn or target reference"):
        density_free_kl_tv(_gauss(10, 2))
    with pytest.raises(ValueError, match="needs target samples y or"):
        knn_tv(_gauss(10, 2))
    with pytest.raises(ValueError, match=r"log_p must have shape \(10,\)"):
        knn_kl_exact(_gauss(10, 2), lq[:5])
    assert knn_kl(torch.zeros(10, 2, dtype=torch.float64), _gauss(10, 2), k=2)["kl"] == math.inf  # singular q
    # folded and no reference in a high dimension: no KL/TV at all, only the checks
    out = valid_kl_tv(_gauss(10, 8), lq, lambda z: lq, 0.3, reference=_gauss(50, 8))
    assert "kl" not in out and out["fold_fraction"] == 0.3 and "w_mean" in out
