"""Tests of the DM family's ``fresh_noise`` backward simulation (DMD2's code: jump to data, re-noise with fresh
noise, the gamma = 1 chain) against the default deterministic jumps (gamma = 0).

With ``fresh`` the state at the anchor is :math:`(1-\\sigma) f_{t\\to0}(x_t) + \\sigma z`; without it,
:math:`f_{t\\to\\sigma}(x_t)`. The method-level test checks that ``fresh_noise`` in the config reaches the anchor
that the student and fake losses use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from _fixtures import class_batch, ring_teacher
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods._shared import dm

torch.set_num_threads(1)
D64 = torch.float64


class _Student(nn.Module):
    """f(x, t, s) = x (1 + t - 2 s): the jump to s and the jump to data differ."""

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x * (1 + t - 2 * s)[:, None]


def test_fresh_backward_simulation_renoises_the_data_jump() -> None:
    sched = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=D64)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=D64)
    index = torch.tensor([0, 1, 2, 2, 1])
    f = _Student()
    torch.manual_seed(7)
    a = dm.backward_simulate(f, noise, sched, index, fresh=True)
    one = lambda v: torch.full((5,), v, dtype=D64)  # noqa: E731
    torch.manual_seed(7)  # the same draws, in the same order: one z per step
    z1 = torch.randn_like(noise)
    x1 = 0.4 * f(noise, one(1.0), one(0.0)) + 0.6 * z1
    z2 = torch.randn_like(noise)
    x2 = 0.75 * f(x1, one(0.6), one(0.0)) + 0.25 * z2
    want = torch.stack([noise[0], x1[1], x2[2], x2[3], x1[4]])
    torch.testing.assert_close(a.x, want)
    torch.testing.assert_close(a.x0, a.x * (1 + a.sigma)[:, None])
    # the default is the deterministic jump f_{t -> s}, which draws nothing
    d = dm.backward_simulate(f, noise, sched, index)
    jump = f(noise, one(1.0), one(0.6))
    torch.testing.assert_close(d.x[1], jump[1])
    assert float((d.x[1:] - a.x[1:]).abs().min()) > 1e-6


def _cdm(**kw: object) -> nn.Module:
    cls = get_method("cdm")
    torch.manual_seed(123)
    return cls(_student_net(param="velocity"), ring_teacher(),
               cls.make_config(guidance=3.0, schedule="fixed", n_steps=2, **kw))


def test_cdm_anchor_follows_fresh_noise_config() -> None:
    b = class_batch(64, seed=3)
    b.u[:, 0] = 0.75  # anchor index 1 of the 2-step schedule: sigma = 0.5 for every sample
    for fresh in (False, True):
        m = _cdm(fresh_noise=fresh)
        torch.manual_seed(0)
        a = m.anchor(b, grad=False)
        assert torch.allclose(a.sigma, torch.full_like(a.sigma, 0.5))
        t1, t0 = torch.ones(64), torch.zeros(64)
        with torch.no_grad():
            torch.manual_seed(0)
            if fresh:
                x0 = m.student(b.x1, t1, t0, cond=b.cond)
                want = 0.5 * x0 + 0.5 * torch.randn_like(x0)
            else:
                want = m.student(b.x1, t1, torch.full((64,), 0.5), cond=b.cond)
        torch.testing.assert_close(a.x, want)


def test_run_sampler_follows_fresh_noise() -> None:
    """A run trained on the fresh-noise chain samples with gamma = 1 by default (each method samples the way it was
    trained); an explicit sampler section or --gamma still wins; without the flag the DM family keeps its jumps."""
    from fewstep.config.build import resolve_sampler
    from fewstep.config.schema import load_config

    for name in ("cdm", "dmd2", "ddmd"):  # defaults, not configs/ (mutation runs copy src/ and tests/ only)
        base = {"method": {"name": name}}
        plain = load_config(None, [], base=base)
        fresh = load_config(None, ["method.cfg.fresh_noise=true"], base=base)
        assert resolve_sampler(plain).gamma == 0.0 and resolve_sampler(fresh).gamma == 1.0
        assert resolve_sampler(fresh).grid == resolve_sampler(plain).grid
        assert resolve_sampler(fresh, gamma=0.0).gamma == 0.0
        assert resolve_sampler(load_config(None, ["method.cfg.fresh_noise=true", "sampler.gamma=0.5"],
                                           base=base)).gamma == 0.5
