r"""Tests added to kill mutants of methods/_shared/dm.py (tools/mutation.py), the student's multi-step chain: fixed
and dynamic schedules, backward simulation to the anchor (chain, gradient, velocity), anchor selection and the DM
real / fake predictions at the anchor, and every refusal by its full message. The formula tests (re-noise levels,
x0-predictions, normaliser, DM / CA / fake-score losses) are in test_mutation_kills_dm.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from fewstep.methods._shared import dm

torch.set_num_threads(1)
D64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_schedules() -> None:
    s = dm.fixed_schedule(4)
    assert s.dtype == D64 and s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert dm.fixed_schedule(1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=re.escape("a schedule needs at least one step; got n_steps=0")):
        dm.fixed_schedule(0)
    ns = set()
    for seed in range(40):
        sched = dm.dynamic_schedule(4, 0.3, 0.6, torch.Generator().manual_seed(seed), n_min=2)
        n = sched.numel() - 1
        ns.add(n)
        assert sched.dtype == D64 and float(sched[0]) == 1.0 and float(sched[-1]) == 0.0
        inner = sched[1:-1]
        assert bool((inner >= 0.3).all()) and bool((inner <= 0.6).all()) and bool((sched[1:] < sched[:-1]).all())
    assert ns == {2, 3, 4}
    # the draw: N = randint(n_min, n_max + 1), then N - 1 uniforms on [low, high], sorted descending
    g = torch.Generator().manual_seed(7)
    n = int(torch.randint(2, 6, (1,), generator=g))
    inner = (0.3 + 0.3 * torch.rand(n - 1, generator=g, dtype=D64)).sort(descending=True).values
    torch.testing.assert_close(dm.dynamic_schedule(5, 0.3, 0.6, torch.Generator().manual_seed(7), n_min=2)[1:-1],
                               inner)
    one = dm.dynamic_schedule(1, generator=torch.Generator().manual_seed(0))
    assert one.dtype == D64 and one.tolist() == [1.0, 0.0]
    tied = dm.dynamic_schedule(4, 0.5, 0.5, torch.Generator().manual_seed(0), n_min=4)  # all inner times tie
    assert tied[1:-1].tolist() == [0.5, 0.5 - 1e-9, 0.5 - 1e-9 - 1e-9]  # each nudged below its predecessor
    for lo, hi in ((0.0, 0.5), (0.6, 0.5), (0.5, 1.0)):
        with pytest.raises(ValueError, match=re.escape(
                f"inner schedule range must satisfy 0 < low <= high < 1; got ({lo}, {hi})")):
            dm.dynamic_schedule(3, lo, hi)
    for n_min, n_max in ((0, 3), (4, 3)):
        with pytest.raises(ValueError, match=re.escape(f"need 1 <= n_min <= n_max; got n_min={n_min}, "
                                                       f"n_max={n_max}")):
            dm.dynamic_schedule(n_max, n_min=n_min)


class _Student(nn.Module):
    """f(x, t, s, c) = x (1 + t - 2 s) + c s (labels as floats; None = 0), with a learnable scale k on x."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.0, dtype=D64))
        self.calls: list[tuple[float, float]] = []

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        if t.numel():
            self.calls.append((float(t[0]), float(s[0])))
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.k * x * (1 + t - 2 * s)[:, None] + (lab * s)[:, None]


def test_backward_simulate_chain_anchor_and_velocity() -> None:
    sched = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=D64)
    noise = _rand(4, 2, seed=10)
    index = torch.tensor([0, 1, 2, 1])
    cond = torch.tensor([1, 0, 2, 1])
    student = _Student()
    a = dm.backward_simulate(student, noise, sched, index, cond)
    assert student.calls[:2] == [(1.0, 0.6), (0.6, 0.25)] and len(student.calls) == 3
    f = student.forward
    with torch.no_grad():
        x1 = f(noise, torch.full((4,), 1.0, dtype=D64), torch.full((4,), 0.6, dtype=D64), cond)
        x2 = f(x1, torch.full((4,), 0.6, dtype=D64), torch.full((4,), 0.25, dtype=D64), cond)
    x = torch.stack([noise[0], x1[1], x2[2], x1[3]])
    sigma = torch.tensor([1.0, 0.6, 0.25, 0.6], dtype=D64)
    torch.testing.assert_close(a.x, x)
    torch.testing.assert_close(a.sigma, sigma)
    assert a.sigma.dtype == D64
    x0 = x * (1 + sigma)[:, None]  # f_{sigma -> 0}(x) = x (1 + sigma)
    torch.testing.assert_close(a.x0, x0)
    torch.testing.assert_close(a.velocity, (x - x0) / sigma[:, None])
    assert a.x0.requires_grad and not a.x.requires_grad and not a.velocity.requires_grad
    assert not dm.backward_simulate(_Student(), noise, sched, index, cond, grad=False).x0.requires_grad
    with torch.no_grad():
        assert not dm.backward_simulate(_Student(), noise, sched, index, cond).x0.requires_grad
    # only the anchor step carries gradient: d x0 / d k = x (1 + sigma) (x itself detached)
    (gk,) = torch.autograd.grad(a.x0.sum(), student.k)
    torch.testing.assert_close(gk, x0.sum())
    # an anchor at sigma = 0 is not allowed, but a tiny sigma keeps the velocity finite
    # (x - x0)/max(sigma, 1e-6): at sigma = 1e-9, x0 = x (1 + 1e-9) and the velocity is -1e-9 x / 1e-6
    b = dm.backward_simulate(_Student(), noise[:1], torch.tensor([1e-9, 0.0], dtype=D64), torch.tensor([0]))
    torch.testing.assert_close(b.velocity, -1e-3 * noise[:1], rtol=1e-5, atol=0.0)
    # a schedule given as Python floats is read in float64 (sigma = 0.6 exactly, not float32's 0.6000000238)
    lst = dm.backward_simulate(_Student(), noise, [1.0, 0.6, 0.25, 0.0], index, cond)
    assert lst.sigma.tolist() == [1.0, 0.6, 0.25, 0.6]
    # float32 noise: times and sigma follow the noise dtype
    s32 = dm.backward_simulate(_Student().float(), noise.float(), sched, index, None)
    assert s32.sigma.dtype == torch.float32 and s32.x0.dtype == torch.float32
    # an empty batch needs no step
    e = dm.backward_simulate(_Student(), noise[:0], sched, index[:0])
    assert e.x.shape == (0, 2)


def test_backward_simulate_refusals() -> None:
    noise, idx = _rand(2, 3), torch.tensor([0, 1])
    for sched in ([1.0, 0.5, 0.5, 0.0], [1.0, 0.5, 0.1], [0.0], [[1.0, 0.0]]):
        with pytest.raises(ValueError, match=re.escape(
                "a student schedule must be a strictly decreasing 1-D sequence ending at 0; got "
                f"{torch.tensor(sched, dtype=D64).tolist()}")):
            dm.backward_simulate(_Student(), noise, torch.tensor(sched, dtype=D64), idx)
    sched = torch.tensor([1.0, 0.5, 0.0], dtype=D64)
    dm.backward_simulate(_Student(), noise, sched, torch.tensor([0, 1]))
    for bad in (torch.tensor([0, 2]), torch.tensor([-1, 0]), torch.tensor([0])):
        with pytest.raises(ValueError, match=re.escape(
                "anchor indices must have shape (2,) with values in [0, 1]")):
            dm.backward_simulate(_Student(), noise, sched, bad)


def test_anchor_index_and_dm_terms() -> None:
    u = torch.tensor([0.0, 0.249, 0.25, 0.74, 0.999, 1.0], dtype=D64)
    idx = dm.anchor_index(u, 4)
    assert idx.dtype == torch.long and idx.tolist() == [0, 0, 1, 2, 3, 3]

    class _Teacher(nn.Module):
        def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
            return guidance * x + (0 if cond is None else cond.to(x.dtype))[:, None]

    class _Fake(nn.Module):
        def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
            return 0.5 * x * t[:, None]

    x0 = _rand(3, 2, seed=11).requires_grad_(True)
    tau = torch.tensor([0.2, 0.5, 0.8], dtype=D64)
    cond = torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    real, fake = dm.dm_terms(_Teacher(), _Fake(), x0, tau, cond, guidance=3.0)
    torch.manual_seed(5)
    eps = torch.randn_like(x0)
    x_tau = (1 - tau)[:, None] * x0.detach() + tau[:, None] * eps
    torch.testing.assert_close(real, x_tau - tau[:, None] * (3.0 * x_tau + cond[:, None].to(D64)))
    torch.testing.assert_close(fake, x_tau - tau[:, None] * 0.5 * x_tau * tau[:, None])
    assert not real.requires_grad and not fake.requires_grad
    torch.manual_seed(5)
    real1, _ = dm.dm_terms(_Teacher(), _Fake(), x0, tau, cond)
    torch.testing.assert_close(real1, x_tau - tau[:, None] * (x_tau + cond[:, None].to(D64)))
