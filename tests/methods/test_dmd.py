"""Tests of the shared DMD pieces (dmd_common) and of the dmd / dmd2 methods on analytic teachers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _fixtures import TeacherAsFake, assert_losses_finite, ring_teacher, small_teacher, student_net
from _fixtures import class_batch as batch
from fewstep.methods import get_method
from fewstep.methods._shared.dm import (
    backward_simulate,
    dm_loss,
    dynamic_schedule,
    fake_score_loss,
    fixed_schedule,
    normaliser,
    renoise_time,
)
from fewstep.sampling.samplers import sample_flowmap
from fewstep.teachers import GaussianMixtureTeacher, TeacherFlowMap

torch.set_num_threads(1)


def student_grad_norm(m: nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in m.parameters() if p.grad is not None))


def class_mean_error(student: nn.Module, teacher: GaussianMixtureTeacher, n_steps: int, n: int = 1000) -> float:
    """Mean over the two classes of |mean of student samples - class mean| (small_teacher)."""
    g = torch.Generator().manual_seed(5)
    c = torch.arange(n) % 2
    with torch.no_grad():
        x = sample_flowmap(student, torch.randn(n, 2, generator=g), n_steps, cond=c).x
    return float(sum((x[c == k].mean(0) - teacher.means[k].float()).norm() for k in range(2)) / 2)


# ---------------------------------------------------------------- the DM gradient
def test_dm_gradient_zero_when_fake_equals_real() -> None:
    torch.manual_seed(0)
    t = ring_teacher()
    m = get_method("dmd2")(student_net(), t, get_method("dmd2").make_config(n_steps=2), fake=TeacherAsFake(t))
    loss, logs = m.loss("student", batch(), 0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)
    assert logs["dm_grad_rms"] == pytest.approx(0.0, abs=1e-10)
    assert student_grad_norm(m.student) == pytest.approx(0.0, abs=1e-10)


def test_dm_loss_gradient_is_normalised_score_difference() -> None:
    g0 = torch.Generator().manual_seed(1)
    x0s = torch.randn(5, 3, generator=g0, requires_grad=True)
    real, fake = torch.randn(5, 3, generator=g0), torch.randn(5, 3, generator=g0)
    n = (real - x0s.detach()).abs().mean(1).clamp(min=0.1)
    expect = (fake - real) / n[:, None]
    loss, g = dm_loss(x0s, real, fake, floor=0.1, convention="dmd2")
    (grad,) = torch.autograd.grad(loss, x0s)
    torch.testing.assert_close(g, expect)
    torch.testing.assert_close(grad, expect / x0s.numel())
    assert float(loss.detach()) == pytest.approx(0.5 * float((expect**2).mean()), rel=1e-6)
    loss_c, _ = dm_loss(x0s, real, fake, floor=0.1, convention="cdm")
    (grad_c,) = torch.autograd.grad(loss_c, x0s)
    torch.testing.assert_close(grad_c, 2 * expect / x0s.numel())  # same direction, twice the size
    with pytest.raises(ValueError, match="convention"):
        dm_loss(x0s, real, fake, convention="nope")
    with pytest.raises(ValueError, match="share a shape"):
        dm_loss(x0s, real[:, :2], fake)


def test_normaliser_floor() -> None:
    a = torch.zeros(3, 4)
    b = torch.tensor([[0.0] * 4, [1.0] * 4, [0.01] * 4])
    torch.testing.assert_close(normaliser(a, b, 0.1), torch.tensor([0.1, 1.0, 0.1]))
    with pytest.raises(ValueError, match="floor"):
        normaliser(a, b, 0.0)


# ---------------------------------------------------------------- schedules and samplers
def test_renoise_time_ranges_and_means() -> None:
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(2))
    tau = renoise_time(u, "uniform")
    assert float(tau.min()) >= 0.02 - 1e-6 and float(tau.max()) <= 0.98 + 1e-6
    assert float(tau.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(tau.var()) == pytest.approx(0.96**2 / 12, rel=0.02)
    sigma = torch.full_like(u, 0.5)
    capped = renoise_time(u, "uniform_capped", sigma)
    assert float(capped.max()) <= 0.5 + 1e-7 and float(capped.min()) >= 0.02 - 1e-6
    # U(0, 0.5) clamped below at 0.02: mean = 0.25 + 0.02^2/(2*0.5)
    assert float(capped.mean()) == pytest.approx(0.25 + 0.0004, abs=0.003)
    with pytest.raises(ValueError, match="sigma"):
        renoise_time(u, "uniform_capped")
    with pytest.raises(ValueError, match="re-noise schedule"):
        renoise_time(u, "lognormal")


def test_fixed_schedule() -> None:
    torch.testing.assert_close(fixed_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        fixed_schedule(0)


def test_dynamic_schedule_statistics() -> None:
    g = torch.Generator().manual_seed(3)
    n_max, lo, hi, draws = 6, 0.25, 0.95, 6000
    counts = [0] * (n_max + 1)
    inner_all, top_of_three = [], []
    for _ in range(draws):
        s = dynamic_schedule(n_max, lo, hi, generator=g)
        n = s.numel() - 1
        counts[n] += 1
        assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
        assert bool((s[1:] < s[:-1]).all())
        inner = s[1:-1]
        assert bool(((inner >= lo) & (inner <= hi)).all())
        inner_all.append(inner)
        if n == 3:
            top_of_three.append(float(inner[0]))
    freqs = torch.tensor(counts[1:], dtype=torch.float64) / draws
    assert float((freqs - 1 / n_max).abs().max()) < 0.025  # N ~ U{1..6}; per-bin std ~ 0.005
    inner = torch.cat(inner_all)
    assert float(inner.mean()) == pytest.approx((lo + hi) / 2, abs=0.01)
    # the larger of two U(a,b) draws has mean a + 2(b-a)/3
    assert sum(top_of_three) / len(top_of_three) == pytest.approx(lo + 2 * (hi - lo) / 3, abs=0.02)
    with pytest.raises(ValueError, match="low"):
        dynamic_schedule(4, 0.0, 0.5)


def test_backward_simulate_matches_manual_chain() -> None:
    def f(x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x * (1 + (t - s)[:, None]) + s[:, None]

    x1 = torch.randn(4, 2)
    sched = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 1])
    a = backward_simulate(f, x1, sched, idx)
    tv = lambda v: torch.full((1,), v)  # noqa: E731
    for i in range(4):
        x = x1[i : i + 1]
        for j in range(int(idx[i])):
            x = f(x, tv(float(sched[j])), tv(float(sched[j + 1])))
        torch.testing.assert_close(a.x[i : i + 1], x)
        sig = float(sched[idx[i]])
        assert float(a.sigma[i]) == pytest.approx(sig)
        torch.testing.assert_close(a.x0[i : i + 1], f(x, tv(sig), tv(0.0)))
        torch.testing.assert_close(a.velocity[i : i + 1], (x - a.x0[i : i + 1]) / sig)
    with pytest.raises(ValueError, match="anchor indices"):
        backward_simulate(f, x1, sched, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="decreasing"):
        backward_simulate(f, x1, torch.tensor([1.0, 0.5]), idx.clamp(max=0))


def test_backward_simulate_gradient_only_at_anchor() -> None:
    s = student_net()
    b = batch(16)
    a = backward_simulate(s, b.x1, fixed_schedule(4), torch.full((16,), 3), b.cond)
    assert not a.x.requires_grad and a.x0.requires_grad and not a.velocity.requires_grad


# ---------------------------------------------------------------- the fake score
def test_fake_score_loss_stationary_at_exact_velocity() -> None:
    """Student = the teacher's exact flow map, so its samples follow the teacher: the FM loss of the fake
    score has zero gradient at fake = real teacher velocity (and a clear gradient for a wrong distribution)."""
    torch.manual_seed(4)
    t = ring_teacher()
    n = 3000
    cond = torch.randint(0, 2, (n,))
    exact = TeacherFlowMap(t, rtol=1e-6, atol=1e-6)
    x0 = backward_simulate(exact, torch.randn(n, 2), fixed_schedule(1), torch.zeros(n, dtype=torch.long), cond).x0
    assert float((t.log_prob(x0, 0.0, cond)).mean()) == pytest.approx(
        float(t.log_prob(t.sample(n, cond=cond), 0.0, cond).mean()), abs=0.1)
    tau = renoise_time(torch.rand(n), "uniform")
    eps = torch.randn(n, 2)
    fake = TeacherAsFake(t)
    loss = fake_score_loss(fake, x0, tau, eps, cond)
    gs, gb = torch.autograd.grad(loss, [fake.scale, fake.bias])
    assert float(gs.abs()) < 0.06 and float(gb.abs().max()) < 0.06
    # a wrong "student distribution" (teacher samples shrunk by half) gives a large gradient
    loss_w = fake_score_loss(fake, 0.5 * x0, tau, eps, cond)
    gs_w, _ = torch.autograd.grad(loss_w, [fake.scale, fake.bias])
    assert float(gs_w.abs()) > 0.3
    # and the loss is minimal at the exact velocity among scaled versions
    with torch.no_grad():
        vals = []
        for sc in (0.9, 1.0, 1.1):
            fake.scale.fill_(sc)
            vals.append(float(fake_score_loss(fake, x0, tau, eps, cond)))
    assert vals[1] < vals[0] and vals[1] < vals[2]


# ---------------------------------------------------------------- boundaries and config
@pytest.mark.parametrize("name", ["dmd", "dmd2"])
def test_losses_finite_at_clamped_time_boundaries(name: str) -> None:
    torch.manual_seed(5)
    t = ring_teacher()
    cls = get_method(name)
    kw = dict(n_steps=2, t_min=0.0, t_max=1.0, guidance=3.0)
    if name == "dmd":
        kw["num_pairs"] = 16
    m = cls(student_net(), t, cls.make_config(**kw))
    m.prepare({"seed": 0})
    assert_losses_finite(m)


def test_dmd2_schedule_trainable_and_config_errors() -> None:
    cls = get_method("dmd2")
    m = cls(student_net(), ring_teacher(), cls.make_config(fake_updates=3))
    assert m.schedule(7) == ["fake", "fake", "fake", "student"]
    assert set(m.trainable()) == {"student", "fake"}
    with pytest.raises(ValueError, match="unknown config key"):
        cls.make_config(fake_steps=3)
    with pytest.raises(ValueError, match="t_min"):
        cls(student_net(), ring_teacher(), cls.make_config(t_min=0.5, t_max=0.2))
    with pytest.raises(ValueError, match="'student' and 'fake'"):
        m.loss("critic", batch(), 0)


def test_dmd_pairs_follow_the_teacher() -> None:
    torch.manual_seed(6)
    t = ring_teacher()
    cls = get_method("dmd")
    m = cls(student_net(), t, cls.make_config(num_pairs=400))
    with pytest.raises(ValueError, match="prepare"):
        m.regression_loss(batch())
    m.prepare({"seed": 0})
    z, y, c = m.pairs
    assert z.shape == y.shape == (400, 2) and c.shape == (400,)
    ref = t.sample(400, cond=c, generator=torch.Generator().manual_seed(0))
    assert float(t.log_prob(y, 0.0, c).mean()) == pytest.approx(float(t.log_prob(ref, 0.0, c).mean()), abs=0.15)


def test_dmd_pairs_of_an_unconditional_student_are_unconditional() -> None:
    """A class-conditional teacher (e.g. the digits preset) and a student without classes: the pairs carry no
    labels (the teacher's marginal field), so the regression loss can run the student."""
    torch.manual_seed(6)
    t = ring_teacher()
    cls = get_method("dmd")
    m = cls(student_net(num_classes=None), t, cls.make_config(num_pairs=200))
    m.prepare({"seed": 0})
    z, y, c = m.pairs
    assert c is None and y.shape == (200, 2)
    ref = t.sample(200, generator=torch.Generator().manual_seed(0))  # the marginal: all four components
    assert float(t.log_prob(y, 0.0).mean()) == pytest.approx(float(t.log_prob(ref, 0.0).mean()), abs=0.15)
    assert torch.isfinite(m.regression_loss(batch()))


# ---------------------------------------------------------------- training falls
@pytest.mark.parametrize("name", ["dmd", "dmd2"])
def test_method_learns_small_problem(name: str) -> None:
    from fewstep import train

    torch.manual_seed(0)
    t = small_teacher()
    kw = dict(fake_updates=2) if name == "dmd2" else dict(num_pairs=512)
    tr = train(name, teacher=t, steps=0, method_cfg=kw, student=dict(hidden=64, depth=2), batch_size=128,
               lr=1e-3, progress=False, tensorboard=False, ema_decays=[])
    m = tr.method
    err0 = class_mean_error(m.student, t, 1)
    tr.config.steps = 150
    tr.fit()
    err1 = class_mean_error(m.student, t, 1)
    assert err0 > 1.0 and err1 < 0.45 * err0
    first = [h for h in tr.history if h["step"] == 50][0]["student/loss"]
    assert tr.history[-1]["student/loss"] < 1.5 * first  # the loss does not blow up


def test_fake_samples_final_trains_on_the_sampler_output() -> None:
    """fake_samples='final': the fake score is fitted to the student's n_steps samples (not a random anchor)."""
    t = ring_teacher()
    cls = get_method("dmd2")
    m = cls(student_net(), t, cls.make_config(n_steps=3, fake_samples="final"))
    b = batch(48)
    with torch.no_grad():
        x_final = sample_flowmap(m.student, b.x1, 3, cond=b.cond).x
    torch.testing.assert_close(m.anchor(b, grad=False, final=True).x0, x_final, atol=1e-6, rtol=1e-6)
    torch.manual_seed(3)
    loss, _ = m.fake_loss(b)
    torch.manual_seed(3)
    eps = torch.randn_like(x_final)
    tau = renoise_time(b.u[:, 6], "uniform")
    torch.testing.assert_close(loss, fake_score_loss(m.fake, x_final, tau, eps, b.cond), atol=1e-6, rtol=1e-6)
    anchor_m = cls(student_net(), t, cls.make_config(n_steps=3))
    anchor_m.student.load_state_dict(m.student.state_dict())
    anchor_m.fake.load_state_dict(m.fake.state_dict())
    torch.manual_seed(3)
    other, _ = anchor_m.fake_loss(b)
    assert abs(float(other.detach()) - float(loss.detach())) > 1e-4  # anchors differ from final samples
    with pytest.raises(ValueError, match="fake_samples"):
        cls(student_net(), t, cls.make_config(fake_samples="last"))
