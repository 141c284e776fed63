"""CDM's ``offtraj_fake``: which fake score the off-trajectory term uses and what that fake is fitted to.

Each test rebuilds the expected number from the formulas (same RNG draws): the fake step's extra flow-matching term
on the off-trajectory predictions (``fit``: the split copies routed by sigma_s; ``own``: a dedicated split copy;
``shared``: one dedicated unsplit copy) and the student's off-trajectory DM term with the dedicated fake.
Setting: guidance 1 (no CA, ``fake_samples`` resolves to ``anchor``), ``fake_split: 4``, the fixed 1-step schedule
(every anchor is sigma = 1, bin 0, so the off-trajectory levels sigma_s ~ U[0.02, 0.98] fall in other bins).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _fixtures import class_batch, ring_teacher, spread_split_fake
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import dm_loss, teacher_x0
from fewstep.methods._shared.split_fake import SplitFake, fake_bin
from fewstep.methods.base import U_AUX, U_CORNER

torch.set_num_threads(1)


def make(**kw: object) -> nn.Module:
    cls = get_method("cdm")
    torch.manual_seed(123)  # identical student and fake weights for every configuration
    cfg = cls.make_config(guidance=1.0, schedule="fixed", n_steps=1, fake_split=4, fake_samples="auto", **kw)
    m = spread_split_fake(cls(_student_net(param="velocity"), ring_teacher(), cfg))
    if m.fake_off is not None:  # make the dedicated copy differ from the fake it was copied from
        torch.manual_seed(9)
        with torch.no_grad():
            for k, p in enumerate(m.fake_off.parameters()):
                p.add_(0.07 * torch.randn_like(p) * (1 + k % 3))
    return m


def routed_velocity(fake: nn.Module, x: Tensor, t: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
    """Row i scored by copy fake_bin(sigma_i) of a split fake, or by the fake itself."""
    if not isinstance(fake, SplitFake):
        return fake.velocity(x, t, cond)
    bins = fake_bin(sigma, len(fake.copies))
    return torch.stack([fake.copies[int(k)].velocity(x[i:i + 1], t[i:i + 1], cond[i:i + 1])[0]
                        for i, k in enumerate(bins)])


def off_prediction(m: nn.Module, b: object) -> tuple[Tensor, Tensor]:
    """(sigma_s, x0_s) by hand: anchor sigma = 1 at the noise, Euler point x_s = x1 + (sigma_s − 1)(x1 − x0)."""
    with torch.no_grad():
        one = torch.ones(b.x1.shape[0])
        x0 = m.student(b.x1, one, torch.zeros_like(one), cond=b.cond)
        lo, hi = m.config.t_min, m.config.t_max
        sigma_s = lo + (hi - lo) * b.u[:, U_AUX]
        x_s = b.x1 + (sigma_s - 1.0)[:, None] * (b.x1 - x0)
        return sigma_s, m.student(x_s, sigma_s, torch.zeros_like(sigma_s), cond=b.cond)


def fitted_fake(m: nn.Module, kind: str) -> nn.Module:
    return m.fake if kind == "fit" else m.fake_off


TRANGES = [{}, {"t_min": 0.1, "t_max": 0.9}]  # the defaults, and a range that differs from renoise_time's defaults


@pytest.mark.parametrize("trange", TRANGES)
@pytest.mark.parametrize("kind", ["fit", "own", "shared"])
def test_fake_step_adds_flow_matching_on_offtraj_predictions(kind: str, trange: dict) -> None:
    """fake loss(kind) = fake loss(split) + FM of the right fake on (x0_s, tau from U_CORNER, the next noise draw)."""
    b = class_batch(64, seed=2)
    m_split, m = make(offtraj_fake="split", **trange), make(offtraj_fake=kind, **trange)
    torch.manual_seed(5)
    l_split, _ = m_split.loss("fake", b, 0)
    assert isinstance(m.fake_off, SplitFake) == (kind == "own") and (m.fake_off is None) == (kind == "fit")
    torch.manual_seed(5)
    l_kind, logs = m.loss("fake", b, 0)
    torch.manual_seed(5)
    torch.randn(64, 2)  # the anchors' noise draw
    eps = torch.randn(64, 2)
    sigma_s, x0_s = off_prediction(m, b)
    tau = m.config.t_min + (m.config.t_max - m.config.t_min) * b.u[:, U_CORNER]
    x_tau = (1 - tau)[:, None] * x0_s + tau[:, None] * eps
    with torch.no_grad():
        want = ((routed_velocity(fitted_fake(m, kind), x_tau, tau, sigma_s, b.cond) - (eps - x0_s)) ** 2).mean()
    torch.testing.assert_close(torch.tensor(logs["fake_off_loss"]), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l_kind.detach() - l_split.detach(), want, rtol=1e-4, atol=1e-6)
    l_kind.backward()  # the off-trajectory fit reaches the copies of the off-trajectory bins
    grads = [p.grad for p in (m.fake.copies[3] if kind == "fit" else m.fake_off).parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_split_fits_no_offtraj_predictions() -> None:
    """The default: anchors only (every anchor is in bin 0, so the other copies get no gradient)."""
    m = make(offtraj_fake="split")
    loss, logs = m.loss("fake", class_batch(64, seed=2), 0)
    loss.backward()
    assert "fake_off_loss" not in logs
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in m.fake.copies[3].parameters())


@pytest.mark.parametrize("renoise", [{}, {"t_min": 0.1, "t_max": 0.9}, {"dm_renoise": "uniform_capped"}])
@pytest.mark.parametrize("kind", ["own", "shared"])
def test_student_offtraj_term_uses_dedicated_fake(kind: str, renoise: dict) -> None:
    """cdm_loss = dm_loss(x0_s, teacher x0, dedicated-fake x0) at tau from U_CORNER (no DM, no CA: first draw); tau
    follows ``dm_renoise`` (uniform on [t_min, t_max], or U(0, sigma_s) clamped)."""
    m = make(offtraj_fake=kind, dm_weight=0.0, ca_weight=0.0, **renoise)
    b = class_batch(64, seed=3)
    torch.manual_seed(6)
    loss, logs = m.loss("student", b, 0)
    loss.backward()  # the term alone moves the student (a gradient-free term would not)
    assert sum(float(p.grad.abs().sum()) for p in m.student.parameters() if p.grad is not None) > 1e-8
    torch.manual_seed(6)
    eps = torch.randn(64, 2)
    sigma_s, x0_s = off_prediction(m, b)
    lo, hi, u = m.config.t_min, m.config.t_max, b.u[:, U_CORNER]
    tau = (u * sigma_s).clamp(lo, hi) if m.config.dm_renoise == "uniform_capped" else lo + (hi - lo) * u
    x_tau = (1 - tau)[:, None] * x0_s + tau[:, None] * eps
    with torch.no_grad():
        x0_real = teacher_x0(m.teacher, x_tau, tau, b.cond, 1.0)
        x0_fake = x_tau - tau[:, None] * routed_velocity(m.fake_off, x_tau, tau, sigma_s, b.cond)
    want, _ = dm_loss(x0_s, x0_real, x0_fake, m.config.norm_floor, "dmd2")
    torch.testing.assert_close(torch.tensor(logs["cdm_loss"]), want, rtol=1e-5, atol=1e-8)
    m_split = make(offtraj_fake="split", dm_weight=0.0, ca_weight=0.0, **renoise)
    torch.manual_seed(6)
    _, logs_split = m_split.loss("student", b, 0)
    assert abs(logs_split["cdm_loss"] - logs["cdm_loss"]) > 1e-6 * logs["cdm_loss"]


def test_dedicated_fake_is_trained_with_the_fake_and_bad_values_fail() -> None:
    m = make(offtraj_fake="own")
    fake_params = {id(p) for p in m.trainable()["fake"].parameters()}
    assert {id(p) for p in m.fake_off.parameters()} <= fake_params
    assert {id(p) for p in m.fake.parameters()} <= fake_params
    m_split = make()
    assert m_split.fake_off is None and m_split.trainable()["fake"] is m_split.fake
    with pytest.raises(ValueError, match="offtraj_fake"):
        make(offtraj_fake="bogus")
    cls = get_method("cdm")
    assert set(m.trainable()) == {"student", "fake"}
    with pytest.raises(ValueError, match="fake_ema merge of the student into it is not defined"):
        cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(offtraj_fake="shared", fake_ema=0.9))


class AnchorSpy:
    """Wraps ``m.anchor`` and ``m.fake_anchor`` and records each call (batch, grad, final) / its count."""

    def __init__(self, m: nn.Module) -> None:
        self.calls: list[tuple[object, bool, bool]] = []
        self.fake_calls = 0
        anchor, fake_anchor = m.anchor, m.fake_anchor

        def spy_anchor(batch: object, grad: bool = True, final: bool = False) -> object:
            self.calls.append((batch, grad, final))
            return anchor(batch, grad=grad, final=final)

        def spy_fake_anchor(batch: object) -> object:
            self.fake_calls += 1
            return fake_anchor(batch)

        m.anchor, m.fake_anchor = spy_anchor, spy_fake_anchor


@pytest.mark.parametrize("dm_at", ["every", "final"])
def test_fit_reuses_the_fake_anchor_or_draws_the_dm_anchor(dm_at: str) -> None:
    """``fit`` fits the predictions the off-trajectory term makes, from the fake step's own anchor when the DM terms
    act at it: ``dm_at=every`` with anchor fake samples, ``dm_at=final`` with final fake samples (the final anchor of
    the fixed schedule). One backward simulation either way."""
    m = make(offtraj_fake="fit", dm_at=dm_at)
    spy = AnchorSpy(m)
    b = class_batch(32, seed=4)
    _, logs = m.loss("fake", b, 0)
    assert "fake_off_loss" in logs and spy.fake_calls == 1
    assert m.fake_samples == ("final" if dm_at == "final" else "anchor")  # what the fake step's anchor is
    fake_step = [(True, False, dm_at == "final")]  # the fake step's own anchor, without gradient
    assert [(c[0] is b, c[1], c[2]) for c in spy.calls] == fake_step


@pytest.mark.parametrize("off", [{"off_trajectory": False}, {"cdm_weight": 0.0}])
def test_fit_is_off_without_the_offtraj_term(off: dict) -> None:
    """No off-trajectory term (switched off, or weight 0): nothing to fit, the fake loss is the split one."""
    b = class_batch(32, seed=4)
    torch.manual_seed(8)
    loss, logs = make(offtraj_fake="fit", **off).loss("fake", b, 0)
    torch.manual_seed(8)
    loss_split, _ = make(offtraj_fake="split", **off).loss("fake", b, 0)
    assert "fake_off_loss" not in logs
    torch.testing.assert_close(loss.detach(), loss_split.detach())


def test_fit_with_final_fake_samples_draws_the_random_dm_anchor() -> None:
    """CA on (``fake_samples: final``) with ``dm_at=every``: the fake step's anchor is the final one, while the
    off-trajectory term acts at the random anchor, so the fit draws that one (no reuse of the final anchor)."""
    cls = get_method("cdm")
    torch.manual_seed(123)
    m = cls(_student_net(param="velocity"), ring_teacher(),
            cls.make_config(guidance=1.0, schedule="fixed", n_steps=2, fake_samples="final", offtraj_fake="fit"))
    spy = AnchorSpy(m)
    b = class_batch(32, seed=4)
    _, logs = m.loss("fake", b, 0)
    assert "fake_off_loss" in logs and spy.fake_calls == 1
    assert [(c[0] is b, c[1], c[2]) for c in spy.calls] == [(True, False, True), (True, False, False)]


def test_fit_with_anchor_fake_samples_at_dm_at_final_draws_the_final_anchor() -> None:
    """``dm_at=final`` with anchor fake samples: the fake step's anchor is a random one, while the off-trajectory
    term acts at the final anchor of the fixed schedule, so the fit draws that one (gradient-free)."""
    cls = get_method("cdm")
    torch.manual_seed(123)
    m = cls(_student_net(param="velocity"), ring_teacher(),
            cls.make_config(guidance=1.0, schedule="fixed", n_steps=2, fake_samples="anchor", dm_at="final",
                            offtraj_fake="fit"))
    spy = AnchorSpy(m)
    b = class_batch(32, seed=4)
    _, logs = m.loss("fake", b, 0)
    assert "fake_off_loss" in logs and spy.fake_calls == 1
    assert [(c[0] is b, c[1], c[2]) for c in spy.calls] == [(True, False, False), (True, False, True)]
