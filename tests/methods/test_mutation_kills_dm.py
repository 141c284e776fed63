r"""Tests added to kill mutants of methods/_shared/dm.py (tools/mutation.py): each DM-family formula against its
equation on small hand-made tensors (re-noise levels, x0-predictions, normaliser, DM / CA / fake-score losses and
their gradients), and every refusal by its full message. Schedules, backward simulation and the anchor's DM terms
are in test_mutation_kills_dm_simulation.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods._shared import dm

torch.set_num_threads(1)
D64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_renoise_time_formulas_and_refusals() -> None:
    u = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=D64)
    torch.testing.assert_close(dm.renoise_time(u), 0.02 + 0.96 * u)
    torch.testing.assert_close(dm.renoise_time(u, t_min=0.1, t_max=0.6), 0.1 + 0.5 * u)
    torch.testing.assert_close(dm.renoise_time(u, "uniform", t_min=0.3, t_max=0.3), torch.full_like(u, 0.3))
    sigma = torch.tensor([0.5, 0.8, 1.0, 0.9], dtype=D64)
    # tau = clamp(u sigma, t_min, t_max): 0 -> 0.02 (defaults), 0.2, 0.5, 0.81 -> 0.8 (t_max)
    torch.testing.assert_close(dm.renoise_time(u, "uniform_capped", sigma, t_max=0.8),
                               torch.tensor([0.02, 0.2, 0.5, 0.8], dtype=D64))
    torch.testing.assert_close(dm.renoise_time(u, "uniform_capped", sigma), torch.tensor([0.02, 0.2, 0.5, 0.81],
                                                                                          dtype=D64))
    dm.renoise_time(u, t_min=0.0, t_max=1.0)
    for lo, hi in ((-0.1, 0.5), (0.6, 0.5), (0.2, 1.1)):
        with pytest.raises(ValueError, match=re.escape(
                f"need 0 <= t_min <= t_max <= 1 for re-noise levels; got t_min={lo}, t_max={hi}")):
            dm.renoise_time(u, t_min=lo, t_max=hi)
    msg = "uniform_capped re-noising needs the student times sigma with the shape of u (4,); got "
    with pytest.raises(ValueError, match=re.escape(msg + "None")):
        dm.renoise_time(u, "uniform_capped")
    with pytest.raises(ValueError, match=re.escape(msg + "(3,)")):
        dm.renoise_time(u, "uniform_capped", sigma[:3])
    with pytest.raises(ValueError, match=re.escape(
            "unknown re-noise schedule 'normal'; expected one of ('uniform', 'uniform_capped')")):
        dm.renoise_time(u, "normal")


def test_renoise_and_x0_predictions() -> None:
    x0, eps = _rand(3, 2, seed=1), _rand(3, 2, seed=2)
    tau = torch.tensor([0.1, 0.5, 0.9], dtype=D64)
    torch.testing.assert_close(dm.renoise(x0, tau, eps), (1 - tau)[:, None] * x0 + tau[:, None] * eps)
    with pytest.raises(ValueError, match=re.escape("noise must have the shape of x0 (3, 2); got (3, 1)")):
        dm.renoise(x0, tau, eps[:, :1])

    class _Teacher(nn.Module):
        """v(x, t, c; w) = w x t + c (labels as floats; None = 0)."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(1.0, dtype=D64))

        def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
            lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
            return self.w * guidance * x * t[:, None] + lab[:, None]

    teacher, x = _Teacher(), _rand(3, 2, seed=3)
    cond = torch.tensor([0, 1, 2])
    got = dm.teacher_x0(teacher, x, tau, cond, guidance=2.0)
    torch.testing.assert_close(got, x - tau[:, None] * (2.0 * x * tau[:, None] + cond[:, None].to(D64)))
    assert not got.requires_grad
    torch.testing.assert_close(dm.teacher_x0(teacher, x, tau, None), x - tau[:, None] * x * tau[:, None])
    # a float64 teacher on float32 states: the prediction keeps the states' dtype
    class _Teacher64(_Teacher):
        def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
            return super().velocity(x, t, cond, guidance).double()

    x32 = x.float()
    got32 = dm.teacher_x0(_Teacher64(), x32, tau.float(), cond)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, (x - tau[:, None] * (x * tau[:, None] + cond[:, None].to(D64))).float())

    class _Fake(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.7, dtype=D64))

        def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
            return self.k * x + (t + (0 if cond is None else cond))[:, None]

    got = dm.fake_x0(_Fake(), x, tau, cond)
    torch.testing.assert_close(got, x - tau[:, None] * (0.7 * x + (tau + cond)[:, None]))
    assert not got.requires_grad


def test_normaliser_dm_loss_and_ca_loss_equations() -> None:
    xs = _rand(4, 3, seed=4).requires_grad_(True)
    xr, xf, xu = _rand(4, 3, seed=5), _rand(4, 3, seed=6), _rand(4, 3, seed=7)
    xr[0] = xs[0].detach() + 0.01  # one row below the floor
    n = (xr - xs.detach()).abs().mean(1).clamp(min=0.1)
    assert float(n[0]) == 0.1 and bool((n[1:] > 0.1).all())
    got = dm.normaliser(xr, xs, 0.1)
    torch.testing.assert_close(got, n)
    assert not got.requires_grad
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=re.escape(f"the normaliser floor must be positive; got {bad}")):
            dm.normaliser(xr, xs, bad)
    g = (xf - xr) / n[:, None]
    for conv, scale in (("dmd2", 0.5), ("cdm", 1.0)):
        loss, g_got = dm.dm_loss(xs, xr, xf, 0.1, conv) if conv == "cdm" else dm.dm_loss(xs, xr, xf)
        torch.testing.assert_close(g_got, g)
        torch.testing.assert_close(loss, scale * (g ** 2).mean())
        (grad,) = torch.autograd.grad(loss, xs)  # the DM gradient direction: scale * 2 g / numel
        torch.testing.assert_close(grad, scale * 2 * g / g.numel())
    loss, _ = dm.dm_loss(xs, xr, xf, floor=5.0)  # every row at the floor 5
    torch.testing.assert_close(loss, 0.5 * (((xf - xr) / 5.0) ** 2).mean())
    # nan_to_num: an infinite difference is mapped to a finite value
    xf_inf = xf.clone()
    xf_inf[0, 0] = float("inf")
    assert bool(torch.isfinite(dm.dm_loss(xs, xr, xf_inf)[1]).all())
    msg = "x0 predictions must share a shape; got (4, 3), (4, 3), (4, 2)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        dm.dm_loss(xs, xr, xf[:, :2])
    with pytest.raises(ValueError, match=re.escape(msg.replace("(4, 3), (4, 3), (4, 2)", "(4, 3), (4, 2), (4, 3)"))):
        dm.dm_loss(xs, xr[:, :2], xf)
    with pytest.raises(ValueError, match=re.escape(
            "unknown DM loss convention 'dmd'; expected 'dmd2' or 'cdm'")):
        dm.dm_loss(xs, xr, xf, 0.1, "dmd")

    # CA: delta = s (x_c - x_u) / n_CA, n_CA = max(mean|x_c - x_s|, floor); loss = mean(delta^2) / 2
    xc = xr
    n_ca = (xc - xs.detach()).abs().mean(1).clamp(min=0.3)
    delta = 1.5 * (xc - xu) / n_ca[:, None]
    loss = dm.ca_loss(xs, xc, xu, 1.5, floor=0.3)
    torch.testing.assert_close(loss, 0.5 * (delta ** 2).mean())
    (grad,) = torch.autograd.grad(loss, xs)  # moves x_s along +delta
    torch.testing.assert_close(grad, -delta / delta.numel())
    torch.testing.assert_close(dm.ca_loss(xs, xc, xu, 1.5), 0.5 * ((1.5 * (xc - xu) / (
        (xc - xs.detach()).abs().mean(1).clamp(min=0.1))[:, None]) ** 2).mean())
    norm = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=D64)
    torch.testing.assert_close(dm.ca_loss(xs, xc, xu, 1.5, norm=norm),
                               0.5 * ((1.5 * (xc - xu) / norm[:, None]) ** 2).mean())
    with pytest.raises(ValueError, match=re.escape("the CA normaliser must have shape (4,); got (3,)")):
        dm.ca_loss(xs, xc, xu, 1.5, norm=norm[:3])
    with pytest.raises(ValueError, match=re.escape("x0 predictions must share a shape; got (4, 3), (4, 3), (4, 2)")):
        dm.ca_loss(xs, xc, xu[:, :2], 1.5)
    with pytest.raises(ValueError, match=re.escape("x0 predictions must share a shape; got (4, 3), (4, 2), (4, 3)")):
        dm.ca_loss(xs, xc[:, :2], xu, 1.5)
    xu_nan = xu.clone()
    xu_nan[1, 1] = float("nan")  # nan_to_num: a NaN difference gives no CA push
    nan_mask = torch.ones_like(xu)
    nan_mask[1, 1] = 0.0
    torch.testing.assert_close(dm.ca_loss(xs, xc, xu_nan, 1.5, norm=norm),
                               0.5 * ((1.5 * nan_mask * (xc - xu) / norm[:, None]) ** 2).mean())


def test_fake_score_loss_and_make_fake_score() -> None:
    class _Fake(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.7, dtype=D64))

        def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
            return self.k * x + (t + (0 if cond is None else cond))[:, None]

    fake = _Fake()
    x0 = _rand(5, 2, seed=8).requires_grad_(True)
    eps, tau = _rand(5, 2, seed=9), torch.linspace(0.1, 0.9, 5, dtype=D64)
    cond = torch.tensor([0, 1, 2, 1, 0])
    x_tau = (1 - tau)[:, None] * x0.detach() + tau[:, None] * eps
    expected = ((0.7 * x_tau + (tau + cond)[:, None] - (eps - x0.detach())) ** 2).mean()
    loss = dm.fake_score_loss(fake, x0, tau, eps, cond)
    torch.testing.assert_close(loss, expected)
    assert torch.autograd.grad(loss, x0, allow_unused=True)[0] is None  # student samples are detached
    assert torch.autograd.grad(dm.fake_score_loss(fake, x0, tau, eps, cond), fake.k)[0] != 0

    net = nn.Linear(2, 2)
    student = FlowMap(net, "average_velocity").requires_grad_(False)
    f = dm.make_fake_score(student)
    assert isinstance(f, FlowMap) and f.parameterization == "velocity"
    assert f.net is not net and torch.equal(f.net.weight, net.weight)
    assert all(p.requires_grad for p in f.parameters()) and not net.weight.requires_grad
    with pytest.raises(ValueError, match=re.escape(
            "the fake score is built from a FlowMap student's backbone; got Linear")):
        dm.make_fake_score(net)
