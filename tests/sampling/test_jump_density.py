"""Fold test: jump_logdet / flowmap_logdensity report the sign of det df/dx and the share of folded samples, and
the E_q[p/q] <= 1 density check fails on a folding map while an injective map passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fewstep import MLP, FlowMap
from fewstep.evaluation.divergences import cov_kl_tv, importance_weight_check
from fewstep.evaluation.metrics import kl_tv_importance
from fewstep.evaluation.valid_kl import valid_kl_tv
from fewstep.sampling.jump_density import flowmap_logdensity, jump_logdet
from fewstep.sampling.logdensity import standard_normal_logprob

torch.set_num_threads(1)
FOLD_EDGE = math.pi / 3  # x - 2 sin x has derivative 1 - 2 cos x < 0 exactly on |x| < pi/3


def _noise(n: int, d: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _folding(x: Tensor, t, s, cond=None) -> Tensor:  # a smooth fold along x_1; identity at t = s
    h = (torch.as_tensor(t, dtype=x.dtype) - torch.as_tensor(s, dtype=x.dtype)).reshape(-1, 1)
    return torch.cat([x[:, :1] - 2 * h * torch.sin(x[:, :1]), x[:, 1:]], 1)


def _abs_map(x: Tensor, t, s, cond=None) -> Tensor:  # f(x) = (|x_1|, x_2): two preimages everywhere
    return torch.cat([x[:, :1].abs(), x[:, 1:]], 1)


def _linear(x: Tensor, t, s, cond=None) -> Tensor:  # injective, det = det A > 0
    a = torch.tensor([[1.3, 0.4], [-0.2, 0.7]], dtype=x.dtype)
    return x @ a.T


def test_fold_detected_with_sign_and_fraction() -> None:
    x = _noise(4000)
    j = jump_logdet(_folding, x, 1.0, 0.0)
    inside = x[:, 0].abs() < FOLD_EDGE
    assert torch.equal(j.sign < 0, inside)  # the sign is reported per row, negative exactly in the fold
    expect = math.erf(FOLD_EDGE / math.sqrt(2))  # P(|N(0,1)| < pi/3) = 0.705
    assert j.fold_fraction == pytest.approx(float(inside.double().mean()))
    assert abs(j.fold_fraction - expect) < 4 * math.sqrt(expect * (1 - expect) / 4000)
    y, ld = j  # unpacks like the former (y, logabsdet) tuple
    assert torch.allclose(ld, torch.log((1 - 2 * torch.cos(x[:, 0])).abs()))
    assert jump_logdet(_linear, x, 1.0, 0.0).fold_fraction == 0.0


def test_flowmap_logdensity_records_folds_of_every_jump() -> None:
    x1 = _noise(2000, seed=1)
    res = flowmap_logdensity(_folding, x1, [1.0, 0.6, 0.2, 0.0])  # jumps of h <= 0.4: 1 - 2h cos x >= 0.2
    assert res.jump_fold_fractions == [0.0, 0.0, 0.0] and res.fold_fraction == 0.0
    res = flowmap_logdensity(_folding, x1, 1)
    assert res.fold_fraction > 0.6 and bool((res.sign[res.folded] < 0).all())
    torch.manual_seed(0)  # a random MLP student: det > 0 near identity, reported either way
    st = FlowMap(MLP(2, hidden=16, depth=2, emb_dim=8), "velocity").double()
    r2 = flowmap_logdensity(st, x1, 2)
    assert r2.folded.shape == (2000,) and len(r2.jump_fold_fractions) == 2
    assert r2.fold_fraction == pytest.approx(float(r2.folded.double().mean()))


def test_density_check_fails_on_folding_map_and_passes_on_injective_map() -> None:
    x1 = _noise(20000, seed=2)
    target = standard_normal_logprob  # normalised p = N(0, I)
    # injective: the weights p/q average to 1 (all of p lies in the image)
    x, log_q = flowmap_logdensity(_linear, x1, 1)
    ok = importance_weight_check(log_q, target(x))
    assert abs(ok["w_mean"] - 1) < 4 * ok["w_se"] + 0.02 and ok["w_ok"] == 1.0
    assert cov_kl_tv(log_q, target(x), 0.0)["w_ok"] == 1.0
    # folding: three preimages on |y_1| < 0.685, so E_q[p/q_cov] = 1 + 2 P(|N(0,1)| < 0.685) = 2.01
    res = flowmap_logdensity(_folding, x1, 1)
    bad = importance_weight_check(res.log_q, target(res.x))
    y_edge = abs(FOLD_EDGE - 2 * math.sin(FOLD_EDGE))
    assert bad["w_mean"] == pytest.approx(1 + 2 * math.erf(y_edge / math.sqrt(2)), abs=6 * bad["w_se"] + 0.03)
    assert bad["w_ok"] == 0.0
    with pytest.raises(ValueError, match=r"folds .* on 70\.\d% of samples"):
        cov_kl_tv(res.log_q, target(res.x), res.fold_fraction)


def test_abs_map_cov_kl_is_invalid_and_replaced_by_knn() -> None:
    """f(x) = (|x_1|, x_2) pushes N(0, I) to the half-normal x normal p; KL(q||p) = 0, but change of variables
    claims q = N(0, I) on the half plane: KL -log 2 < 0 and E_q[p/q] = 2."""
    x1 = _noise(4000, seed=3)
    res = flowmap_logdensity(_abs_map, x1, 1)

    def log_p(z: Tensor) -> Tensor:  # exact density of the pushforward (z_1 >= 0)
        return math.log(2) + standard_normal_logprob(z)

    assert res.fold_fraction == pytest.approx(float((x1[:, 0] <= 0).double().mean()))
    for kw in ({"log_p_fn": log_p}, {"reference": _abs_map(_noise(40000, seed=4), 1.0, 0.0)}):
        out = valid_kl_tv(res.x, None, **kw)  # density-free only: exact log p, or target samples alone
        assert out["kl_from_cov"] == 0.0 and abs(out["kl"]) < 0.05, kw  # q = p
    out = valid_kl_tv(res.x, res.log_q, log_p, res.fold_fraction)
    assert out["w_mean"] == pytest.approx(2.0) and out["w_ok"] == 0.0
    assert out["kl_from_cov"] == 0.0 and abs(out["kl"]) < 0.05  # the change of variables is replaced
    assert out["kl"] == out["kl_knn"] and out["tv"] == out["tv_knn"]
    assert kl_tv_importance(res.log_q, log_p(res.x))["kl"] == pytest.approx(-math.log(2))  # what it would claim
    # the injective image of the same noise keeps the change of variables, with both estimates beside it
    x, log_q = flowmap_logdensity(_linear, x1, 1)
    ok = valid_kl_tv(x, log_q, standard_normal_logprob, 0.0)
    assert ok["kl_from_cov"] == 1.0 and ok["kl"] == pytest.approx(ok["kl_knn"], abs=0.03 + 3 * ok["kl_knn_se"])
