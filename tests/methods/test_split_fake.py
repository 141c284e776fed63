"""Tests of ``fake_split``: one fake-score copy per anchor-level bin, each fitted to and queried for its own bin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _fixtures import class_batch, ring_teacher, spread_split_fake
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import fake_score_loss, fixed_schedule, renoise_time
from fewstep.methods._shared.split_fake import SplitFake, fake_bin
from fewstep.methods.base import U_FAKE, U_S

torch.set_num_threads(1)


def make(name: str = "ddmd", **kw: object) -> nn.Module:
    cls = get_method(name)
    torch.manual_seed(123)
    cfg = cls.make_config(guidance=1.0, fake_samples="auto", **kw)
    return spread_split_fake(cls(_student_net(param="velocity"), ring_teacher(), cfg))


def test_bins_of_the_uniform_grid_and_of_sigma_one() -> None:
    """The n-step grid with K = n gives each anchor its own bin; σ = 1 is bin 0; K = 1 puts everything in bin 0."""
    sched = fixed_schedule(4)[:-1].float()  # 1, .75, .5, .25
    assert fake_bin(sched, 4).tolist() == [0, 1, 2, 3]
    assert fake_bin(torch.tensor([1.0, 0.99, 0.3, 0.02]), 3).tolist() == [0, 1, 2, 2]
    assert fake_bin(sched, 1).tolist() == [0, 0, 0, 0]


def per_row(m: nn.Module, fn, sigma: torch.Tensor):  # noqa: ANN001, ANN202
    """Evaluate ``fn(copy, rows)`` with each row's own copy, stitched back in row order."""
    bins = fake_bin(sigma, len(m.fake.copies))
    return [(bins == k, fn(c, bins == k)) for k, c in enumerate(m.fake.copies)]


def test_fake_loss_fits_each_copy_to_its_bin() -> None:
    """The split fake loss is the row-mean of each row's flow-matching loss under its own bin's copy."""
    m = make(n_steps=4, fake_split=4)
    b = class_batch(256, seed=3)
    torch.manual_seed(5)
    loss, _ = m.fake_loss(b)
    a = m.anchor(b, grad=False)
    torch.manual_seed(5)
    eps = torch.randn_like(a.x0)
    tau = renoise_time(b.u[:, U_FAKE], "uniform", t_min=m.config.t_min, t_max=m.config.t_max)
    parts = per_row(m, lambda c, r: fake_score_loss(c, a.x0[r], tau[r], eps[r], b.cond[r]) * int(r.sum()), a.sigma)
    assert all(int(r.sum()) > 0 for r, _ in parts)
    torch.testing.assert_close(loss, sum(v for _, v in parts) / b.x1.shape[0], atol=1e-6, rtol=1e-5)
    m.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None for p in m.fake.parameters())  # every copy is trained on its rows


@pytest.mark.parametrize("name", ["ddmd", "cdm"])
def test_dm_term_scores_each_row_with_its_copy(name: str) -> None:
    """dm_term at anchor levels σ uses the copy of each row's bin (equal to the per-copy computation)."""
    extra = dict(schedule="fixed", off_trajectory=False) if name == "cdm" else {}
    m = make(name, n_steps=4, fake_split=4, **extra)
    b = class_batch(128, seed=4)
    a = m.anchor(b, grad=False)
    torch.manual_seed(9)
    loss, g, _ = m.dm_term(a.x0, a.sigma, b.u[:, U_S], b.cond)
    torch.manual_seed(9)
    eps = torch.randn_like(a.x0)
    tau = renoise_time(b.u[:, U_S], m.config.dm_renoise, a.sigma, m.config.t_min, m.config.t_max)
    x_tau = (1 - tau[:, None]) * a.x0 + tau[:, None] * eps
    want = torch.zeros_like(a.x0)
    for r, v in per_row(m, lambda c, r: x_tau[r] - tau[r, None] * c.velocity(x_tau[r], tau[r], b.cond[r]), a.sigma):
        want[r] = v.detach()
    single = make(name, n_steps=4, **extra)  # copy 0 for every row: a different gradient
    torch.manual_seed(9)
    _, g1, _ = single.dm_term(a.x0, a.sigma, b.u[:, U_S], b.cond)
    from fewstep.methods._shared.dm import teacher_x0

    x0_real = teacher_x0(m.teacher, x_tau, tau, b.cond)
    n = (x0_real - a.x0).abs().mean(dim=1).clamp(min=m.config.norm_floor)
    torch.testing.assert_close(g, (want - x0_real) / n[:, None], atol=1e-5, rtol=1e-4)
    assert float((g - g1).norm()) > 1e-3 * float(g.norm())


def test_split_only_with_anchor_fake_samples_and_errors() -> None:
    """fake_split = 1 keeps the plain fake; K > 1 splits only when fake_samples resolves to anchor (w = 1 under
    auto), not under final (w > 1 under auto: the guided configs keep one fake score); bad values raise."""
    assert not isinstance(make(n_steps=4).fake, SplitFake)
    assert isinstance(make(n_steps=4, fake_split=2).fake, SplitFake)
    cls = get_method("ddmd")
    guided = cls(_student_net(param="velocity"), ring_teacher(),
                 cls.make_config(guidance=3.0, fake_samples="auto", fake_split=4))
    assert guided.fake_samples == "final" and not isinstance(guided.fake, SplitFake)
    for bad in (dict(fake_split=0), dict(fake_split=2, fake_ema=0.5)):
        cls = get_method("ddmd")
        with pytest.raises(ValueError, match="fake_split"):
            cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(guidance=1.0, **bad))
