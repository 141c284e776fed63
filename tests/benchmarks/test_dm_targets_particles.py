"""Tests of the particle version of the DMD2 loss (fewstep.benchmarks.dm_targets_particles): its fake score."""

from __future__ import annotations

import torch

from fewstep.benchmarks.dm_targets_particles import fake_x0_particles

torch.set_num_threads(1)


def _setup(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    cond = torch.arange(n) % 3
    tau = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    x_tau = (1 - tau)[:, None] * x + tau[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, cond, tau, x_tau


def test_single_neighbour_gives_the_gaussian_posterior_mean() -> None:
    """With one other particle x_j of the label, x̂0 = E[x0 | x_tau] for x0 ~ N(x_j, h² I), x_tau = (1-τ)x0 + τε."""
    x = torch.tensor([[0.3, -0.2], [1.0, 2.0]], dtype=torch.float64)
    cond = torch.tensor([0, 0])
    tau = torch.tensor([0.4, 0.7], dtype=torch.float64)
    x_tau = torch.tensor([[0.5, 0.5], [-1.0, 0.2]], dtype=torch.float64)
    h = 0.3
    out = fake_x0_particles(x_tau, tau, x, cond, h)
    for i, j in ((0, 1), (1, 0)):  # leave-one-out: particle i sees only particle j
        a = 1 - float(tau[i])
        gain = a * h**2 / (a**2 * h**2 + float(tau[i]) ** 2)
        torch.testing.assert_close(out[i], x[j] + gain * (x_tau[i] - a * x[j]))


def test_other_labels_and_the_particle_itself_are_ignored() -> None:
    """Moving particle i, or particles of other labels, leaves particle i's fake x0-prediction unchanged."""
    x, cond, tau, x_tau = _setup()
    base = fake_x0_particles(x_tau, tau, x, cond, 0.05)
    i = 4
    moved = x.clone()
    moved[i] += 0.7  # itself
    moved[cond != cond[i]] += torch.tensor([3.0, -2.0], dtype=torch.float64)  # other labels
    torch.testing.assert_close(fake_x0_particles(x_tau, tau, moved, cond, 0.05)[i], base[i])
    same = (cond == cond[i]).nonzero().flatten()
    j = int(same[same != i][0])
    moved[j] += 0.5  # a neighbour of the same label does count
    assert float((fake_x0_particles(x_tau, tau, moved, cond, 0.05)[i] - base[i]).abs().max()) > 1e-6
