"""Tests of CDM: off-trajectory points, schedule switches, ablation flags, boundaries and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _fixtures import TeacherAsFake, assert_losses_finite, ring_teacher, small_teacher
from _fixtures import class_batch as batch
from _fixtures import student_net as _student_net
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.dm import fixed_schedule
from fewstep.sampling.samplers import sample_flowmap

torch.set_num_threads(1)


def student_net() -> FlowMap:
    """The tiny conditional student with the velocity parameterization."""
    return _student_net(param="velocity")


def make(**kw: object) -> nn.Module:
    cls = get_method("cdm")
    return cls(student_net(), ring_teacher(), cls.make_config(**kw))


def test_euler_extrapolation_reuses_trajectory_noise() -> None:
    """x_s = x_sigma + (sigma_s - sigma) v equals (1 - sigma_s) x0_hat + sigma_s x1_hat on the linear path."""
    m = make()
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    sigma, sigma_s = torch.rand(50, generator=g) * 0.9 + 0.05, torch.rand(50, generator=g)
    x = (1 - sigma[:, None]) * x0 + sigma[:, None] * x1
    v = (x - x0) / sigma[:, None]
    out = m.off_trajectory_point(x, sigma, v, x0, sigma_s)
    torch.testing.assert_close(out, (1 - sigma_s[:, None]) * x0 + sigma_s[:, None] * x1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.off_trajectory_point(x, sigma, v, x0, sigma), x)


def test_gaussian_perturbation_statistics() -> None:
    torch.manual_seed(1)
    m = make(perturbation="gaussian")
    n = 40_000
    x0 = torch.full((n, 2), 0.7)
    sigma_s = torch.full((n,), 0.4)
    out = m.off_trajectory_point(torch.zeros(n, 2), torch.full((n,), 0.5), torch.zeros(n, 2), x0, sigma_s)
    resid = out - 0.6 * x0
    assert float(resid.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(resid.std()) == pytest.approx(0.4, rel=0.02)


def test_schedule_switch() -> None:
    torch.manual_seed(2)
    torch.testing.assert_close(make(schedule="fixed", n_steps=4).student_schedule(), fixed_schedule(4))
    dyn = make(schedule="dynamic", n_max=5, inner_min=0.3, inner_max=0.6)
    lengths = set()
    for _ in range(300):
        s = dyn.student_schedule()
        lengths.add(s.numel() - 1)
        assert float(s[0]) == 1.0 and float(s[-1]) == 0.0 and bool((s[1:] < s[:-1]).all())
        assert bool(((s[1:-1] >= 0.3) & (s[1:-1] <= 0.6)).all())
    assert lengths == {1, 2, 3, 4, 5}
    short = {make(n_min=3, n_max=5).student_schedule().numel() - 1 for _ in range(200)}
    assert short == {3, 4, 5}


@pytest.mark.parametrize("bad,match", [(dict(schedule="cosine"), "schedule"),
                                       (dict(perturbation="heun"), "perturbation"),
                                       (dict(inner_min=0.9, inner_max=0.5), "inner_min"), (dict(n_max=0), "n_max"),
                                       (dict(n_min=6, n_max=5), "n_min")])
def test_config_errors(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**bad)


def test_ablation_flags_select_terms() -> None:
    torch.manual_seed(3)
    _, full = make(guidance=3.0).loss("student", batch(), 0)
    assert {"ca_loss", "dm_loss", "cdm_loss"} <= set(full)
    _, no_off = make(guidance=3.0, off_trajectory=False).loss("student", batch(), 0)
    assert "cdm_loss" not in no_off and "dm_loss" in no_off
    _, ca_only = make(guidance=3.0, dm_weight=0.0, cdm_weight=0.0).loss("student", batch(), 0)
    assert set(ca_only) == {"ca_loss", "loss"}
    assert ca_only["loss"] == pytest.approx(ca_only["ca_loss"], rel=1e-6)


def test_zero_gradient_when_fake_is_real_without_guidance() -> None:
    torch.manual_seed(4)
    t = ring_teacher()
    cls = get_method("cdm")
    m = cls(student_net(), t, cls.make_config(guidance=1.0), fake=TeacherAsFake(t))
    loss, logs = m.loss("student", batch(), 0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-10 and logs["cdm_loss"] < 1e-10
    assert float(sum(p.grad.abs().sum() for p in m.student.parameters() if p.grad is not None)) < 1e-8


def test_fake_ema_merge_moves_fake_towards_student() -> None:
    torch.manual_seed(5)
    m = make(fake_ema=0.9)
    with torch.no_grad():
        for p in m.fake.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in m.fake.parameters()]
    m.after_update("fake", 0)
    for b, p, s in zip(before, m.fake.parameters(), m.student.parameters()):
        torch.testing.assert_close(p.detach(), 0.9 * b + 0.1 * s.detach())
    with pytest.raises(ValueError, match="fake_ema"):
        make(fake_ema=1.0)


def test_finite_at_clamped_boundaries() -> None:
    torch.manual_seed(6)
    for pert in ("euler", "gaussian"):
        assert_losses_finite(make(t_min=0.0, t_max=1.0, perturbation=pert, guidance=3.0, inner_min=1e-4,
                                  inner_max=0.9999))


def test_cdm_learns_small_problem() -> None:
    from fewstep import train

    torch.manual_seed(0)
    t = small_teacher()
    c = torch.arange(800) % 2

    def err(student: nn.Module) -> float:
        with torch.no_grad():
            x = sample_flowmap(student, torch.randn(800, 2, generator=torch.Generator().manual_seed(1)), 2, cond=c).x
        return float(torch.stack([x[c == k].mean(0) for k in range(2)]).sub(t.means.float()).norm(dim=1).mean())

    tr = train("cdm", teacher=t, steps=0, method_cfg=dict(guidance=1.0, n_max=3), student=dict(hidden=64, depth=2),
               batch_size=128, lr=1e-3, progress=False, tensorboard=False, ema_decays=[])
    e0 = err(tr.method.student)
    tr.config.steps = 150
    tr.fit()
    e1 = err(tr.method.student)
    assert e0 > 1.0 and e1 < 0.45 * e0
    assert all(math.isfinite(h["student/loss"]) for h in tr.history)
