r"""Tests added to kill mutants of methods/dmd.py and methods/dmd2.py (tools/mutation.py).

DMD's regression pairs: :math:`z \sim N(0, I)` and labels :math:`c \sim U\{0..K-1\}` from one generator seeded with
run seed + ``PAIR_SEED_OFFSET``, :math:`y` = the teacher's adaptive solve of z from 1 to 0 (tolerance
``pair_rtol``, guidance only when w != 1); the regression loss :math:`\mathrm{mean}\|f(z_i) - y_i\|^2` with
:math:`i = \mathrm{clamp}(\lfloor u_5 N\rfloor, 0, N-1)`; the student loss :math:`L_{DM} + \lambda_{reg} L_{reg}`.
DMD2's student loss is :math:`L_{DM}` alone. Each is rebuilt from the shared DM pieces (tested in test_dmd.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fewstep.methods.dmd as dmd_mod
from _fixtures import class_batch, ring_teacher, student_net
from fewstep.methods import get_method
from fewstep.methods.base import U_ZERO
from fewstep.sampling.samplers import sample_flowmap

torch.set_num_threads(1)


class _Recorder:
    """Stands in for ``solve_adaptive``: records the call and returns y = 2 z + 1 in float32."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, fn: Any, z: Tensor, t0: float, t1: float, **kw: Any) -> SimpleNamespace:
        self.calls.append((fn, z, t0, t1, kw))
        assert not torch.is_grad_enabled()
        return SimpleNamespace(x=(2 * z + 1).float())


class _PlainTeacher(nn.Module):
    """A teacher without ``event_shape`` or ``num_classes`` (the shape comes from the context)."""

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:  # pragma: no cover
        return x


@pytest.mark.parametrize(("guidance", "seed"), [(1.0, None), (2.5, 3)])
def test_prepare_pairs_are_the_seeded_teacher_solve(monkeypatch: pytest.MonkeyPatch, guidance: float,
                                                    seed: int | None) -> None:
    rec = _Recorder()
    monkeypatch.setattr(dmd_mod, "solve_adaptive", rec)
    cls = get_method("dmd")
    teacher = ring_teacher()
    m = cls(student_net().double(), teacher, cls.make_config(num_pairs=9, guidance=guidance, pair_rtol=3e-4))
    m.prepare({} if seed is None else {"seed": seed})
    z, y, c = m.pairs
    gen = torch.Generator().manual_seed((seed or 0) + dmd_mod.PAIR_SEED_OFFSET)
    z_ref = torch.randn((9, 2), generator=gen)
    c_ref = torch.randint(0, 2, (9,), generator=gen)
    assert z.dtype == y.dtype == torch.float64
    torch.testing.assert_close(z, z_ref.double())
    torch.testing.assert_close(c, c_ref)
    torch.testing.assert_close(y, (2 * z_ref.double() + 1).float().double())
    (fn, zz, t0, t1, kw), = rec.calls
    assert fn is teacher and zz is z and (t0, t1) == (1.0, 0.0)
    want = {"cond": c, "rtol": 3e-4, "atol": 3e-4, **({} if guidance == 1.0 else {"guidance": guidance})}
    assert set(kw) == set(want) and kw["cond"] is c
    assert all(kw[k] == want[k] for k in want if k != "cond")


def test_prepare_shape_from_context_and_unconditional(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(dmd_mod, "solve_adaptive", rec)
    cls = get_method("dmd")
    m = cls(student_net(num_classes=None), _PlainTeacher(), cls.make_config(num_pairs=5))
    m.prepare({"seed": 1, "event_shape": (3,)})
    z, _, c = m.pairs
    gen = torch.Generator().manual_seed(1 + dmd_mod.PAIR_SEED_OFFSET)
    torch.testing.assert_close(z, torch.randn((5, 3), generator=gen))
    assert c is None and rec.calls[0][4]["cond"] is None
    m.prepare({"seed": 1})  # neither the teacher nor the context names a shape: one scalar per pair
    assert m.pairs[0].shape == (5,)


def test_keyword_construction_and_one_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """The constructor passes keyword arguments on; a single regression pair is allowed."""
    monkeypatch.setattr(dmd_mod, "solve_adaptive", _Recorder())
    cls = get_method("dmd")
    teacher, fake = ring_teacher(), nn.Linear(2, 2)
    m = cls(student=student_net(), teacher=teacher, config=cls.make_config(num_pairs=1, reg_weight=0.3), fake=fake)
    assert m.teacher is teacher and m.fake is fake and m.config.reg_weight == 0.3
    m.prepare({})
    assert m.pairs[0].shape == (1, 2)


def test_prepare_refuses_no_pairs() -> None:
    cls = get_method("dmd")
    m = cls(student_net(), ring_teacher(), cls.make_config(num_pairs=0))
    with pytest.raises(ValueError, match=r"^dmd needs num_pairs >= 1 regression pairs; got 0$"):
        m.prepare({})
    with pytest.raises(ValueError, match=r"^dmd regression pairs are missing: call method\.prepare\(context\) "
                       r"before training$"):
        m.regression_loss(class_batch(4))


@pytest.mark.parametrize(("n_steps", "classes"), [(1, 2), (2, None)])
def test_regression_loss_indexes_the_pairs_by_u5(n_steps: int, classes: int | None) -> None:
    cls = get_method("dmd")
    torch.manual_seed(2)
    m = cls(student_net(num_classes=classes), ring_teacher(), cls.make_config(n_steps=n_steps))
    g = torch.Generator().manual_seed(4)
    n = 10
    z, y = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    c = None if classes is None else torch.randint(0, 2, (n,), generator=g)
    m.pairs = (z, y, c)
    b = class_batch(6, seed=1)
    b.u[:, U_ZERO] = torch.tensor([0.0, 0.05, 0.55, 0.999, 1.0, 0.31])
    idx = torch.tensor([0, 0, 5, 9, 9, 3])
    out = sample_flowmap(m.student, z[idx], n_steps, cond=None if c is None else c[idx]).x
    torch.testing.assert_close(m.regression_loss(b), ((out - y[idx]) ** 2).mean())


def test_dmd_student_loss_is_dm_plus_weighted_regression() -> None:
    cls = get_method("dmd")
    torch.manual_seed(3)
    m = cls(student_net(), ring_teacher(), cls.make_config(num_pairs=12, reg_weight=0.7, guidance=2.0))
    m.prepare({"seed": 0})
    b = class_batch(16, seed=2)
    torch.manual_seed(9)
    loss, logs = m.loss("student", b, 0)
    torch.manual_seed(9)
    dm, dm_logs = m.dm_student_loss(b)
    reg = m.regression_loss(b)
    torch.testing.assert_close(loss, dm + 0.7 * reg)
    assert loss.requires_grad
    assert logs["reg_loss"] == pytest.approx(float(reg), rel=1e-6)
    assert logs["loss"] == pytest.approx(float(dm + 0.7 * reg), rel=1e-6)
    assert logs["dm_loss"] == pytest.approx(dm_logs["dm_loss"], rel=1e-6)


def test_dmd2_student_loss_is_the_dm_loss() -> None:
    cls = get_method("dmd2")
    torch.manual_seed(3)
    m = cls(student_net(), ring_teacher(), cls.make_config(guidance=2.0))
    b = class_batch(16, seed=2)
    torch.manual_seed(9)
    loss, logs = m.loss("student", b, 0)
    torch.manual_seed(9)
    dm, dm_logs = m.dm_student_loss(b)
    torch.testing.assert_close(loss, dm)
    assert logs["loss"] == pytest.approx(float(dm), rel=1e-6)
    assert logs["dm_loss"] == pytest.approx(dm_logs["dm_loss"], rel=1e-6)


# ---------------------------------------------------------------- methods/_shared/dm_base.py
def _dmd2(**kw: object) -> nn.Module:
    cls = get_method("dmd2")
    torch.manual_seed(3)
    return cls(student_net(), ring_teacher(), cls.make_config(**kw))


def test_dm_config_refusals_and_boundaries() -> None:
    with pytest.raises(ValueError, match=r"^need n_steps >= 1 and fake_updates >= 0; got n_steps=0, fake_updates=2$"):
        _dmd2(n_steps=0, fake_updates=2)
    with pytest.raises(ValueError, match=r"fake_updates=-1$"):
        _dmd2(n_steps=1, fake_updates=-1)
    with pytest.raises(ValueError, match=r"^need 0 <= t_min <= t_max <= 1; got t_min=0.2, t_max=1.5$"):
        _dmd2(t_min=0.2, t_max=1.5)
    for bad in (1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^fake_ema must lie in \[0, 1\); got {bad}$"):
            _dmd2(fake_ema=bad)
    m = _dmd2(fake_updates=0, t_min=0.4, t_max=0.4)
    assert m.schedule(0) == ["student"]


def test_after_update_merges_the_student_into_the_fake_only_after_fake_steps() -> None:
    m = _dmd2(fake_ema=0.75)
    for p in m.fake.parameters():
        p.data.add_(1.0)
    before = [p.detach().clone() for p in m.fake.parameters()]
    m.after_update("student", 0)
    assert all(torch.equal(a, p) for a, p in zip(before, m.fake.parameters()))
    m.after_update("fake", 0)
    for a, p, s in zip(before, m.fake.parameters(), m.student.parameters()):
        torch.testing.assert_close(p.detach(), 0.75 * a + 0.25 * s.detach())


def test_fake_loss_is_detached_from_the_student_on_the_configured_range() -> None:
    m = _dmd2(t_min=0.3, t_max=0.6, n_steps=2)
    b = class_batch(20, seed=6)
    torch.manual_seed(2)
    loss, logs = m.fake_loss(b)
    torch.manual_seed(2)
    a = m.anchor(b, grad=False)
    tau = 0.3 + 0.3 * b.u[:, 6]
    eps = torch.randn_like(a.x0)
    from fewstep.methods._shared.dm import fake_score_loss
    torch.testing.assert_close(loss, fake_score_loss(m.fake, a.x0, tau, eps, b.cond))
    assert logs == {"fake_loss": pytest.approx(float(loss))}
    grads = torch.autograd.grad(loss, list(m.student.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


def test_dm_student_loss_equation_with_guidance_range_and_logs() -> None:
    from fewstep.methods._shared.dm import dm_loss, dm_terms
    m = _dmd2(t_min=0.2, t_max=0.5, guidance=2.5, norm_floor=0.07)
    b = class_batch(20, seed=8)
    torch.manual_seed(5)
    loss, logs = m.dm_student_loss(b)
    torch.manual_seed(5)
    a = m.anchor(b, grad=True)
    tau = 0.2 + 0.3 * b.u[:, 1]
    x0_real, x0_fake = dm_terms(m.teacher, m.fake, a.x0, tau, b.cond, 2.5)
    ref, g = dm_loss(a.x0, x0_real, x0_fake, 0.07, "dmd2")
    torch.testing.assert_close(loss, ref)
    assert logs["dm_loss"] == pytest.approx(float(ref), rel=1e-6)
    assert logs["dm_grad_rms"] == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-6)


def test_base_student_loss_is_abstract() -> None:
    from fewstep.methods._shared.dm_base import DistributionMatchingMethod
    m = _dmd2()
    with pytest.raises(NotImplementedError, match=r"^DMD2 must implement student_loss\(\)$"):
        DistributionMatchingMethod.student_loss(m, class_batch(4), 0)


def test_anchor_grad_flag_fake_step_without_student_graph_and_step_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _dmd2(n_steps=2)
    b = class_batch(8, seed=1)
    assert m.anchor(b).x0.requires_grad and not m.anchor(b, grad=False).x0.requires_grad
    seen: list[object] = []
    real_anchor = m.anchor

    def anchor(batch: object, **kw: object) -> object:
        seen.append(kw)
        return real_anchor(batch, **kw)

    monkeypatch.setattr(m, "anchor", anchor)
    m.fake_loss(b)
    assert seen == [{"grad": False, "final": False}]
    monkeypatch.setattr(m, "student_loss", lambda batch, step: (torch.zeros(()), {"step": step}))
    assert m.loss("student", b, 7)[1] == {"step": 7}
