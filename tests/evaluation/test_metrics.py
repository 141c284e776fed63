"""Sample metrics: floors for independent sets of one target, clear gaps for shifted targets, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fewstep.evaluation.metrics import (
    coupling_error,
    frechet_distance,
    kl_tv_importance,
    mean_loglik,
    mmd2,
    mode_coverage,
    sliced_w2,
    straightness,
    w2,
)
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mmd2_bruteforce(x: Tensor, y: Tensor, hs: tuple[float, ...]) -> float:
    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * k(x, y).mean())


def test_mmd2_matches_bruteforce_with_chunks_and_scale() -> None:
    x = torch.randn(70, 3, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(50, 3, generator=_gen(1), dtype=torch.float64) + 0.3
    hs = (0.05, 0.2, 1.0)
    ref = _mmd2_bruteforce(x, y, tuple(h * math.sqrt(1.5) for h in hs))
    assert mmd2(x, y, hs, chunk=7) == pytest.approx(ref, rel=1e-10)  # scale="auto": h * sqrt(d / 2)
    assert mmd2(x, y, hs, scale="none") == pytest.approx(_mmd2_bruteforce(x, y, hs), rel=1e-10)
    assert mmd2(x, y, hs, scale=2.0) == pytest.approx(_mmd2_bruteforce(x, y, tuple(2 * h for h in hs)), rel=1e-10)


def test_mmd2_floor_and_shift_ring8() -> None:
    ring = load_preset("ring8")
    a, b = ring.sample(2000, generator=_gen(0)), ring.sample(2000, generator=_gen(1))
    floor = mmd2(a, b)
    assert abs(floor) < 5e-3  # docs/methods.md §7: 3e-4 +- 8e-4 per seed at 2000 vs 2000 (we see std ~1.5e-3)
    assert mmd2(a, b + torch.tensor([0.3, 0.0])) > 0.05  # 0.12 measured: > 20x the floor band
    # docs/methods.md §7: one Euler step of the exact teacher collapses to the mean (0, 0): MMD^2 ~ 3.03
    collapsed = 1e-3 * torch.randn(2000, 2, generator=_gen(2))
    assert mmd2(collapsed, b) == pytest.approx(3.03, abs=0.03)


def test_w2_translation_and_floor() -> None:
    x = torch.randn(300, 2, generator=_gen(0), dtype=torch.float64)
    c = torch.tensor([0.6, -0.8], dtype=torch.float64)
    assert w2(x, x + c) == pytest.approx(1.0, abs=1e-9)  # translation: the identity coupling is optimal
    y = torch.randn(300, 2, generator=_gen(1), dtype=torch.float64)
    floor = w2(x, y)
    assert floor < 0.35
    assert w2(x, y + c) > floor + 0.5


def test_sliced_w2_translation_and_floor() -> None:
    x = torch.randn(400, 4, generator=_gen(0), dtype=torch.float64)
    c = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # |c| = 2, E (theta.c)^2 = |c|^2 / d = 1
    assert sliced_w2(x, x + c, n_proj=4000, generator=_gen(1)) == pytest.approx(1.0, rel=0.05)
    y = torch.randn(300, 4, generator=_gen(2), dtype=torch.float64)  # unequal sizes use quantiles
    floor = sliced_w2(x, y, generator=_gen(3))
    assert floor < 0.2
    assert sliced_w2(x, y + c, generator=_gen(3)) > 0.8


def test_kl_tv_importance_matches_gaussian_closed_forms() -> None:
    n = 20000
    q = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    p = torch.distributions.Normal(torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))
    torch.manual_seed(0)
    x = q.sample((n,))
    out = kl_tv_importance(q.log_prob(x), p.log_prob(x))
    kl_true = float(torch.distributions.kl_divergence(q, p))
    assert abs(out["kl"] - kl_true) <= 4 * out["kl_se"]
    # TV(N(0,1), N(1,1)) = 2 Phi(1/2) - 1
    p1 = torch.distributions.Normal(torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    tv = kl_tv_importance(q.log_prob(x), p1.log_prob(x))
    tv_true = math.erf(0.5 / math.sqrt(2))
    assert abs(tv["tv"] - tv_true) <= 4 * tv["tv_se"]
    assert abs(tv["tv_abs"] - tv_true) <= 4 * tv["tv_abs_se"]
    same = kl_tv_importance(q.log_prob(x), q.log_prob(x))
    assert same["kl"] == 0.0 and same["tv"] == 0.0


def test_kl_tv_singular_q() -> None:
    out = kl_tv_importance(torch.full((10,), float("inf")), torch.zeros(10))
    assert out["kl"] == float("inf") and out["tv"] == 1.0


def test_mode_coverage_exact_partial_and_off_mode() -> None:
    ring = load_preset("ring8")
    x, comp = ring.sample(20000, generator=_gen(0), return_components=True)
    cov = mode_coverage(x, ring)
    assert cov["modes_covered"] == 1.0
    assert cov["off_mode"] == pytest.approx(0.0027, abs=0.0012)  # P(|N(0,1)| > 3) in any dimension
    assert max(abs(s - 0.125 * (1 - cov["off_mode"])) for s in cov["per_mode"]) < 0.01
    half = x[comp < 4]
    assert mode_coverage(half, ring)["modes_covered"] == 0.5
    assert mode_coverage(x * 1.5, ring)["off_mode"] > 0.99
    ring_c = load_preset("ring8", conditional=True)  # class c = components {c, c + 4}
    labels = torch.full((20000,), 1)
    xc = ring_c.sample(20000, cond=labels, generator=_gen(1))
    cc = mode_coverage(xc, ring_c, cond=labels)
    assert cc["expected"][1] == pytest.approx(0.5) and cc["expected"][5] == pytest.approx(0.5)
    assert cc["expected"][0] == 0.0 and cc["modes_covered"] == 1.0
    assert cc["per_mode"][1] == pytest.approx(0.5, abs=0.02) and cc["per_mode"][0] == 0.0


def test_mean_loglik_is_negative_entropy() -> None:
    aniso = load_preset("aniso3")
    x = aniso.sample(4000, generator=_gen(0), dtype=torch.float64)
    lp = aniso.log_prob(x, 0.0)
    assert mean_loglik(x, aniso) == pytest.approx(float(lp.mean()), abs=1e-12)
    assert mean_loglik(x + 0.5, aniso) < mean_loglik(x, aniso) - 1.0


def test_coupling_error_values() -> None:
    a = torch.zeros(4, 2)
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    out = coupling_error(a, b)
    assert out["mean_l2"] == pytest.approx(2.0) and out["mse"] == pytest.approx(7.5)


def test_straightness_zero_for_straight_and_known_for_circle() -> None:
    ts = torch.linspace(1, 0, 11, dtype=torch.float64)
    x0, x1 = torch.randn(8, 2, generator=_gen(0)), torch.randn(8, 2, generator=_gen(1))
    traj = [(1 - t) * x0 + t * x1 for t in ts]  # linear-path conditional field: straight at constant speed
    assert straightness(traj, ts) == pytest.approx(0.0, abs=1e-12)
    const = [x1 - (1 - t) * torch.tensor([1.0, -2.0]) for t in ts]  # Euler under a constant velocity field
    assert straightness(const, ts) == pytest.approx(0.0, abs=1e-12)
    # quarter circle x(t) = (cos(pi t/2), sin(pi t/2)): S = pi^2/4 - 2
    tc = torch.linspace(0, 1, 2001, dtype=torch.float64)
    circle = torch.stack([torch.cos(math.pi * tc / 2), torch.sin(math.pi * tc / 2)], -1)[:, None, :]
    assert straightness(circle, tc) == pytest.approx(math.pi**2 / 4 - 2, rel=1e-4)
    # non-uniform speed on a straight line is also penalised: x(t) = t^2 e1, S = int (1 - 2t)^2 = 1/3
    quad = (tc**2)[:, None, None] * torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert straightness(quad, tc) == pytest.approx(1 / 3, rel=1e-4)


def test_frechet_distance_closed_form() -> None:
    from scipy.linalg import sqrtm

    a = torch.randn(3000, 3, generator=_gen(0), dtype=torch.float64)
    b = torch.randn(3000, 3, generator=_gen(1), dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0]], dtype=torch.float64) + 1.0
    c1, c2 = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float((c1 + c2 - 2 * sqrtm(c1 @ c2).real).trace())
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="same event size"):
        mmd2(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="scale"):
        mmd2(torch.zeros(5, 2), torch.zeros(5, 2), scale="sqrt")
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2(torch.zeros(5, 2), torch.zeros(5, 2), bandwidths=(0.1, -1.0))
    with pytest.raises(ValueError, match="paired"):
        coupling_error(torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="states"):
        straightness([torch.zeros(3, 2)] * 3, [1.0, 0.0])
