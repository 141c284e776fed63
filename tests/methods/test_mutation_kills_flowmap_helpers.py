r"""Tests added to kill mutants of methods/_shared/flowmap_helpers.py (tools/mutation.py): the per-sample squared
norm, MeanFlow's adaptive weight :math:`\Delta / \mathrm{sg}((\Delta + c)^p)` (value and gradient), sCM's tangent
normalisation :math:`g / (\|g\| + c)`, the warm-up ratio, and the time samplers ``sample_t_s`` and
``consistency_time`` on hand-picked uniforms (ties, overrides and refusals with their full messages).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from fewstep.core.timesteps import sample_time
from fewstep.methods._shared.flowmap_helpers import (
    adaptive_weight,
    consistency_time,
    sample_t_s,
    sq_norm,
    tangent_normalize,
    warmup_ratio,
)

torch.set_num_threads(1)


def _x() -> torch.Tensor:
    return torch.arange(12, dtype=torch.float64).reshape(2, 3, 2) * 0.5 - 1.5


def test_sq_norm_is_the_per_sample_sum_of_squares() -> None:
    x = _x()
    want = torch.tensor([sum(float(v) ** 2 for v in x[i].flatten()) for i in range(2)], dtype=torch.float64)
    got = sq_norm(x)
    assert got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_adaptive_weight_value_and_stopped_gradient() -> None:
    delta = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    assert adaptive_weight(delta, 0.0, 0.7) is delta  # p = 0: plain delta
    for p, c in ((1.0, 0.7), (0.5, 0.3), (2.0, 1e-3)):
        out = adaptive_weight(delta, p, c)
        d = delta.detach()
        torch.testing.assert_close(out, d / (d + c) ** p, rtol=1e-12, atol=0)
        (g,) = torch.autograd.grad(out.sum(), delta)
        torch.testing.assert_close(g, 1 / (d + c) ** p, rtol=1e-12, atol=0)  # the weight is detached


def test_tangent_normalize_divides_by_the_per_sample_norm_plus_c() -> None:
    g = _x()
    for c in (0.0, -1.0):
        assert tangent_normalize(g, c) is g
    for c in (0.5, 2.0):
        out = tangent_normalize(g, c)
        for i in range(2):
            n = float(g[i].pow(2).sum().sqrt())
            torch.testing.assert_close(out[i], g[i] / (n + c), rtol=1e-12, atol=0)


def test_warmup_ratio() -> None:
    assert warmup_ratio(5, 0, 0.7) == 0.7
    assert warmup_ratio(5, -2, 0.7) == 0.7
    assert warmup_ratio(0, 0) == 1.0
    assert warmup_ratio(0, 1, 0.7) == 0.0
    assert warmup_ratio(3, 4) == 0.75
    assert warmup_ratio(5, 10, 0.8) == pytest.approx(0.4, abs=1e-15)
    assert warmup_ratio(20, 10, 0.8) == pytest.approx(0.8, abs=1e-15)
    assert warmup_ratio(-3, 10, 0.8) == 0.0
    assert isinstance(warmup_ratio(1, 2, 1), float) and isinstance(warmup_ratio(1, 0, 1), float)


def _msg(*f: float) -> str:
    return re.escape(f"equal_fraction, corner_fraction and zero_fraction must lie in [0, 1]; got {f[0]}, {f[1]}, "
                     f"{f[2]}")


def test_sample_t_s_refusals_with_full_messages() -> None:
    u = torch.full((2, 6), 0.5, dtype=torch.float64)
    for f in ((-0.1, 0.0, 0.0), (1.1, 0.0, 0.0), (0.0, -0.1, 0.0), (0.0, 1.5, 0.0), (0.0, 0.0, -0.2),
              (0.0, 0.0, 1.2)):
        with pytest.raises(ValueError, match=_msg(*f)):
            sample_t_s(u, "uniform", 0.0, 1.0, f[0], corner_fraction=f[1], zero_fraction=f[2])
    for f in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)):  # boundaries accepted
        sample_t_s(u, "uniform", 0.0, 1.0, f[0], corner_fraction=f[1], zero_fraction=f[2])
    shape_msg = "{} > 0 needs uniforms u of shape (B, >={}); got {}"
    with pytest.raises(ValueError, match=re.escape(shape_msg.format("zero_fraction", 6, (2, 5)))):
        sample_t_s(u[:, :5], "uniform", 0.0, 1.0, 0.0, zero_fraction=0.1)
    with pytest.raises(ValueError, match=re.escape(shape_msg.format("corner_fraction", 5, (2, 4)))):
        sample_t_s(u[:, :4], "uniform", 0.0, 1.0, 0.0, corner_fraction=0.1)
    sample_t_s(u[:, :6], "uniform", 0.0, 1.0, 0.0, zero_fraction=0.1)  # exactly enough columns
    sample_t_s(u[:, :5], "uniform", 0.0, 1.0, 0.0, corner_fraction=0.1)
    sample_t_s(u[:, :3], "uniform", 0.0, 1.0, 0.5)  # fractions 0 (the defaults) never read columns 4, 5


def test_sample_t_s_uniform_values_ties_and_overrides() -> None:
    u = torch.tensor([[0.2, 0.8, 0.9, 0.9, 0.9, 0.9],   # plain: t = max, s = min
                      [0.7, 0.1, 0.9, 0.9, 0.9, 0.9],   # other order
                      [0.6, 0.3, 0.25, 0.9, 0.9, 0.9],  # s = t
                      [0.6, 0.3, 0.3, 0.9, 0.9, 0.9],   # u2 == equal_fraction: no tie
                      [0.6, 0.3, 0.25, 0.9, 0.9, 0.1],  # s = t_min overrides s = t
                      [0.6, 0.3, 0.9, 0.9, 0.9, 0.2],   # u5 == zero_fraction: no tie
                      [0.6, 0.3, 0.9, 0.9, 0.1, 0.9],   # corner
                      [0.6, 0.3, 0.9, 0.9, 0.15, 0.9],  # u4 == corner_fraction: no tie
                      [0.6, 0.3, 0.2, 0.9, 0.1, 0.1]],  # corner overrides both
                     dtype=torch.float64)
    lo, hi = 0.1, 0.9

    def tm(v: float) -> float:
        return lo + (hi - lo) * v

    t, s = sample_t_s(u, "uniform", 5.0, 3.0, 0.3, t_min=lo, t_max=hi, corner_fraction=0.15, zero_fraction=0.2)
    want_t = [tm(0.8), tm(0.7), tm(0.6), tm(0.6), tm(0.6), tm(0.6), hi, tm(0.6), hi]
    want_s = [tm(0.2), tm(0.1), tm(0.6), tm(0.3), lo, tm(0.3), lo, tm(0.3), lo]
    torch.testing.assert_close(t, torch.tensor(want_t, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s, torch.tensor(want_s, dtype=torch.float64), rtol=0, atol=1e-12)
    # defaults t_min = 0, t_max = 1 for the corner
    t, s = sample_t_s(u[6:7], "uniform", 0.0, 1.0, 0.0, corner_fraction=0.15)
    assert float(t) == 1.0 and float(s) == 0.0


def test_sample_t_s_logit_normal_passes_its_parameters() -> None:
    u = torch.tensor([[0.2, 0.8, 0.9], [0.7, 0.4, 0.9], [0.5, 0.5, 0.1]], dtype=torch.float64)
    t, s = sample_t_s(u, "logit_normal", 0.6, 1.7, 0.05, t_min=0.2, t_max=0.85)
    a = sample_time(u[:, 0], "logit_normal", 0.2, 0.85, 0.6, 1.7)
    b = sample_time(u[:, 1], "logit_normal", 0.2, 0.85, 0.6, 1.7)
    torch.testing.assert_close(t, torch.maximum(a, b), rtol=0, atol=0)
    torch.testing.assert_close(s, torch.minimum(a, b), rtol=0, atol=0)


def test_consistency_time() -> None:
    cfg = SimpleNamespace(time_sampler="logit_normal", t_min=0.1, t_max=0.8, logit_mean=0.3, logit_std=1.4)
    for f in (-0.1, 1.1):
        with pytest.raises(ValueError, match=re.escape(f"t_one_fraction must lie in [0, 1]; got {f}")):
            consistency_time(torch.zeros(2, 6), cfg, f)
    u = torch.tensor([[0.3, 0.9, 0.9, 0.1], [0.6, 0.9, 0.9, 0.25], [0.9, 0.9, 0.9, 0.5]], dtype=torch.float64)
    base = sample_time(u[:, 0], "logit_normal", 0.1, 0.8, 0.3, 1.4)
    t = consistency_time(u, cfg, 0.25)
    torch.testing.assert_close(t, torch.stack([torch.tensor(0.8, dtype=torch.float64), base[1], base[2]]),
                               rtol=0, atol=0)
    torch.testing.assert_close(consistency_time(u, cfg, 1.0), torch.full((3,), 0.8, dtype=torch.float64),
                               rtol=0, atol=0)
    torch.testing.assert_close(consistency_time(u[:, :1], cfg, 0.0), base, rtol=0, atol=0)  # column 3 unread
