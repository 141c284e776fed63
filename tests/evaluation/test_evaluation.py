"""Evaluation dicts: exact samples sit at the floor, solvers reproduce docs/methods.md §7, flow maps = solvers."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep import VelocityFlowMap
from fewstep.evaluation.evaluate import (
    evaluate_flowmap,
    evaluate_samples,
    evaluate_velocity_solver,
    noise,
    reference_samples,
    teacher_endpoint,
)
from fewstep.teachers import GaussianMixtureTeacher
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def test_evaluate_samples_exact_vs_shifted() -> None:
    ring = load_preset("ring8")
    x = ring.sample(1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    good = evaluate_samples(x, ring)
    bad = evaluate_samples(x + torch.tensor([0.4, 0.0], dtype=torch.float64), ring)
    assert set(good) == {"mmd2", "mean_loglik", "modes_covered", "off_mode", "w2"}
    assert abs(good["mmd2"]) < 6e-3 and bad["mmd2"] > 0.1
    assert good["modes_covered"] == 1.0 and good["off_mode"] < 0.01 and bad["off_mode"] > 0.5
    assert bad["w2"] > good["w2"] + 0.15
    # mean log-likelihood of exact samples = -entropy of ring8 (8 well-separated modes):
    # -H = log(1/8) - log(2 pi 0.01) - 1
    assert good["mean_loglik"] == pytest.approx(math.log(1 / 8) - math.log(2 * math.pi * 0.01) - 1, abs=0.1)


def test_euler_solver_reproduces_anchor_numbers_and_nfe() -> None:
    ring = load_preset("ring8")
    x1 = noise(1000, ring, seed=0)
    x_t, nfe_ref = teacher_endpoint(ring, x1)
    one = evaluate_velocity_solver(ring, ring, "euler", 1, n=1000, x_teacher=x_t)
    four = evaluate_velocity_solver(ring, ring, "heun", 2, n=1000, x_teacher=x_t)
    assert one["nfe"] == 1 and four["nfe"] == 4
    assert one["mmd2"] == pytest.approx(3.03, abs=0.05)  # docs/methods.md §7
    assert one["kl"] == float("inf") and one["tv"] == 1.0  # one Euler step maps everything to ~(0, 0)
    assert one["modes_covered"] == 0.0
    assert 0 < four["kl"] < 50 and four["coupling_l2"] < one["coupling_l2"]
    assert nfe_ref > 20


def test_adaptive_solver_is_at_the_floor() -> None:
    ring = load_preset("aniso3")
    out = evaluate_velocity_solver(ring, ring, "dopri5", n=500, seed=1)
    assert out["coupling_l2"] < 1e-3
    assert abs(out["kl"]) < 3e-3 and abs(out["kl"]) <= 4 * out["kl_se"] + 1e-3
    assert abs(out["mmd2"]) < 1e-2


def test_flowmap_evaluation_equals_euler_solver() -> None:
    """A velocity flow map of the teacher sampled with k jumps is exactly k Euler steps."""
    aniso = load_preset("aniso3")
    fm = VelocityFlowMap(lambda x, t, cond=None: aniso.velocity(x, t, cond))
    # k = 1, 4: grid times are exact in float32 (utils.as_time rounds Python floats through float32)
    res = evaluate_flowmap(fm, aniso, nfe=(1, 4), n=400, seed=2)
    for k in (1, 4):
        ref = evaluate_velocity_solver(aniso, aniso, "euler", k, n=400, seed=2)
        assert res[k]["nfe"] == k
        for key in ("mmd2", "mean_loglik", "w2", "coupling_l2", "kl", "tv"):
            assert res[k][key] == pytest.approx(ref[key], rel=1e-8, abs=1e-10), key
    assert res[4]["kl"] < res[1]["kl"]


def test_conditional_evaluation_uses_labels() -> None:
    ring = load_preset("ring8", conditional=True)
    labels = torch.arange(600) % 4
    ref = reference_samples(ring, 600, seed=0, cond=labels)
    out = evaluate_velocity_solver(ring, ring, "heun", 8, n=600, cond=labels, reference=ref)
    wrong = evaluate_samples(ref, ring, cond=(labels + 1) % 4)  # right points, wrong labels
    assert out["modes_covered"] == 1.0 and out["mean_loglik"] > wrong["mean_loglik"] + 10


def test_high_dimensional_metrics_and_digit_keys() -> None:
    g = torch.Generator().manual_seed(0)
    means = 0.5 * torch.randn(3, 64, generator=g, dtype=torch.float64)
    covs = 0.05 * torch.eye(64, dtype=torch.float64).expand(3, 64, 64)
    teacher = GaussianMixtureTeacher([0.5, 0.3, 0.2], means, covs)
    x = teacher.sample(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = evaluate_samples(x, teacher)
    shifted = evaluate_samples(x + 0.3, teacher)
    assert {"sliced_w2", "fd_digits", "fd_digits_real"} <= set(out) and "kl" not in out
    assert shifted["sliced_w2"] > 3 * out["sliced_w2"]
    assert shifted["fd_digits"] > 3 * out["fd_digits"]
    assert abs(out["mmd2"]) < 0.02 and shifted["mmd2"] > 0.1


def test_evaluation_errors() -> None:
    ring = load_preset("ring8")
    with pytest.raises(ValueError, match="shape"):
        evaluate_samples(torch.zeros(10, 3), ring)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_samples(torch.full((10, 2), float("nan")), ring)
    with pytest.raises(ValueError, match="n >= 2"):
        noise(1, ring)
