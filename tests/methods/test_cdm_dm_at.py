"""Tests of CDM's ``dm_at`` option: where the DM and off-trajectory terms act (the CA term stays put).

With ``dm_at="final"`` the DM term and the off-trajectory term act on the final anchor of the fixed ``n_steps``
schedule (the student's n_steps sample, what the fake score models under ``fake_samples="final"``), CA on the
random anchor. Each test compares the student gradient of the method's loss with one computed by hand from
``anchor(final=True)`` on the same random stream (``schedule="fixed"`` draws nothing from the global RNG).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _fixtures import class_batch, ring_teacher
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import renoise_time
from fewstep.methods.base import U_AUX, U_CORNER, U_S, Batch

torch.set_num_threads(1)


def make(**kw: object) -> nn.Module:
    cls = get_method("cdm")
    torch.manual_seed(123)  # identical student and fake weights for every configuration
    return cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(guidance=3.0, schedule="fixed", **kw))


def flat_grad(m: nn.Module, loss: Tensor) -> Tensor:
    m.student.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in m.student.parameters()]
    )


def method_grad(m: nn.Module, b: Batch, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    loss, _ = m.loss("student", b, 0)
    return flat_grad(m, loss)


def close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6 * float(b.norm()) + 1e-10, rtol=1e-5)


def test_dm_term_acts_at_final_anchor() -> None:
    """DM only: the gradient is that of L_DM at anchor(final=True), and differs from the random-anchor gradient."""
    b = class_batch(64, seed=3)
    kw = dict(ca_weight=0.0, off_trajectory=False)
    m = make(dm_at="final", **kw)
    g = method_grad(m, b)
    torch.manual_seed(0)
    a = m.anchor(b, grad=True, final=True)
    assert torch.allclose(a.sigma, torch.full_like(a.sigma, 0.25))
    loss, _, _ = m.dm_term(a.x0, a.sigma, b.u[:, U_S], b.cond)
    close(g, flat_grad(m, loss))
    g_every = method_grad(make(dm_at="every", **kw), b)
    assert float((g - g_every).norm()) > 1e-2 * float(g_every.norm())


def test_off_trajectory_term_starts_from_final_anchor() -> None:
    """Off-trajectory only: x_s is extrapolated from the final anchor's (x, σ, v), not from the random anchor."""
    b = class_batch(64, seed=4)
    kw = dict(ca_weight=0.0, dm_weight=0.0, cdm_weight=1.0)
    m = make(dm_at="final", **kw)
    g = method_grad(m, b)
    torch.manual_seed(0)
    a = m.anchor(b, grad=True, final=True)
    sigma_s = renoise_time(b.u[:, U_AUX], "uniform", t_min=m.config.t_min, t_max=m.config.t_max)
    x_s = m.off_trajectory_point(a.x, a.sigma, a.velocity, a.x0, sigma_s)
    x0_s = m.student(x_s, sigma_s, torch.zeros_like(sigma_s), cond=b.cond)
    loss, _, _ = m.dm_term(x0_s, sigma_s, b.u[:, U_CORNER], b.cond)
    close(g, flat_grad(m, loss))
    g_every = method_grad(make(dm_at="every", **kw), b)
    assert float((g - g_every).norm()) > 1e-2 * float(g_every.norm())


def test_ca_term_stays_at_random_anchor() -> None:
    """CA only: ``dm_at`` does not move CA (identical gradients), so at w = 1 nothing acts at the early anchors."""
    b = class_batch(64, seed=5)
    kw = dict(dm_weight=0.0, off_trajectory=False)
    g_final = method_grad(make(dm_at="final", **kw), b)
    g_every = method_grad(make(dm_at="every", **kw), b)
    assert float(g_every.norm()) > 1e-8
    close(g_final, g_every)


def test_full_loss_differs_and_is_finite() -> None:
    """All terms on (the shipped weights): the option changes the loss value; both settings are finite."""
    b = class_batch(64, seed=6)
    vals = []
    for dm_at in ("every", "final"):
        torch.manual_seed(0)
        loss, logs = make(dm_at=dm_at).loss("student", b, 0)
        assert torch.isfinite(loss) and min(logs["ca_loss"], logs["dm_loss"], logs["cdm_loss"]) > 0
        vals.append(float(loss))
    assert abs(vals[0] - vals[1]) > 1e-6 * abs(vals[0])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(dm_at="middle"), r"^config key dm_at='middle' is not valid; expected one of \('every', 'final'\)$"),
        (
            dict(dm_at="final", ca_norm="dm"),
            r"^ca_norm='dm' shares the DM normaliser per sample, which needs DM at CA's anchor; "
            r"use dm_at='every' or another ca_norm$",
        ),
    ],
)
def test_dm_at_config_errors(bad: dict, match: str) -> None:
    """An unknown ``dm_at`` and the per-sample DM normaliser shared across two anchors are refused."""
    with pytest.raises(ValueError, match=match):
        make(**bad)
