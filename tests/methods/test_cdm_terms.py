"""Tests that CDM's terms and ablation switches act on the student's gradient and loss, not only on the logs.

(a) the off-trajectory term carries gradient to the student (a detached / no-grad term would leave the gradient
unchanged); (b) the student is evaluated at the extrapolated latent x_s at time sigma_s, not at the anchor;
(c) every ablation switch of the CDM paper changes the loss value.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _fixtures import class_batch, ring_teacher
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import renoise_time
from fewstep.methods.base import U_AUX

torch.set_num_threads(1)


def make(**kw: object) -> nn.Module:
    cls = get_method("cdm")
    torch.manual_seed(123)  # identical student and fake weights for every configuration
    return cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(guidance=3.0, **kw))


def student_grad(m: nn.Module, seed: int = 0) -> tuple[Tensor, dict[str, float]]:
    """The flattened student gradient of one student loss (global RNG seeded, so runs are comparable)."""
    torch.manual_seed(seed)
    m.student.zero_grad(set_to_none=True)
    loss, logs = m.loss("student", class_batch(64, seed=seed), 0)
    loss.backward()
    return torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in m.student.parameters()]
    ), logs


def test_off_trajectory_term_changes_student_gradient() -> None:
    """grad(full) − grad(no off-trajectory) is the off-trajectory term's gradient: non-zero and linear in w_CDM."""
    g_off, _ = student_grad(make(off_trajectory=False))
    g1, logs = student_grad(make(cdm_weight=1.0))
    g2, _ = student_grad(make(cdm_weight=2.0))
    assert logs["cdm_loss"] > 0
    d1, d2 = g1 - g_off, g2 - g_off
    assert float(d1.norm()) > 1e-3 * float(g_off.norm()) and float(d1.norm()) > 1e-8
    torch.testing.assert_close(d2, 2.0 * d1, atol=1e-6 * float(g1.norm()), rtol=1e-4)
    g_only, _ = student_grad(make(ca_weight=0.0, dm_weight=0.0, cdm_weight=1.0))
    assert float(g_only.norm()) > 1e-8  # the term alone moves the student


class _Recorder:
    """Forward hook recording (x, t, s, output) of every student call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        x, t, s = args[:3]
        b = x.shape[0]
        self.calls.append(
            (
                x.detach().clone(),
                torch.as_tensor(t).expand(b).clone(),
                torch.as_tensor(s).expand(b).clone(),
                out.detach().clone(),
            )
        )


@pytest.mark.parametrize("perturbation", ["euler", "gaussian"])
def test_student_is_evaluated_at_extrapolated_latent(perturbation: str) -> None:
    """The off-trajectory student call takes (x_s, sigma_s): sigma_s from column U_AUX, x_s from the anchor."""
    m = make(perturbation=perturbation)
    rec = _Recorder()
    m.student.register_forward_hook(rec, with_kwargs=True)
    b = class_batch(64, seed=1)
    torch.manual_seed(1)
    m.loss("student", b, 0)
    to_zero = [c for c in rec.calls if bool((c[2] == 0).all())]
    assert len(to_zero) == 2, "expected the anchor call and the off-trajectory call, both jumping to s = 0"
    (x_a, sigma, _, x0_a), (x_s, sigma_s, _, _) = to_zero
    cfg = m.config
    expected_sigma_s = renoise_time(b.u[:, U_AUX], "uniform", t_min=cfg.t_min, t_max=cfg.t_max)
    torch.testing.assert_close(sigma_s, expected_sigma_s)
    assert float((sigma_s - sigma).abs().min()) > 0  # not the anchor time
    if perturbation == "euler":  # x_s = x_sigma + (sigma_s - sigma) (x_sigma - x0)/sigma
        expected = x_a + (sigma_s - sigma)[:, None] * (x_a - x0_a) / sigma[:, None]
        torch.testing.assert_close(x_s, expected, atol=1e-5, rtol=1e-5)
    else:  # x_s - (1 - sigma_s) x0 is noise of sd sigma_s, independent of the anchor state
        resid = (x_s - (1 - sigma_s)[:, None] * x0_a) / sigma_s[:, None]
        assert 0.7 < float(resid.std()) < 1.3
        assert float((x_s - x_a).abs().max()) > 1e-3


def _loss(m: nn.Module, seed: int = 2) -> tuple[float, dict[str, float]]:
    torch.manual_seed(seed)
    with torch.no_grad():
        loss, logs = m.loss("student", class_batch(64, seed=seed), 0)
    return float(loss), logs


@pytest.mark.parametrize(
    "switch",
    [
        dict(schedule="fixed"),
        dict(off_trajectory=False),
        dict(perturbation="gaussian"),
        dict(dm_weight=0.0, cdm_weight=0.0),
    ],
)
def test_ablation_switch_changes_loss_value(switch: dict) -> None:
    """Each of the paper's ablations (fixed schedule, no off-trajectory, Gaussian perturbation, CA only) changes the
    loss value on the same batch, weights and random stream."""
    full, _ = _loss(make())
    again, _ = _loss(make())
    assert full == again  # the comparison is deterministic
    abl, _ = _loss(make(**switch))
    assert abs(abl - full) > 1e-6 * max(abs(full), 1e-12)


def test_loss_is_weighted_sum_of_logged_terms() -> None:
    """L = w_CA L_CA + w_DM L_DM + w_CDM L_CDM with the configured weights (the weights enter the value)."""
    loss, logs = _loss(make(ca_weight=0.5, dm_weight=2.0, cdm_weight=3.0))
    assert loss == pytest.approx(0.5 * logs["ca_loss"] + 2.0 * logs["dm_loss"] + 3.0 * logs["cdm_loss"], rel=1e-5)
    assert min(logs["ca_loss"], logs["dm_loss"], logs["cdm_loss"]) > 0


def test_fixed_schedule_switch_reaches_the_anchors() -> None:
    """With schedule=fixed every anchor time lies on the uniform n_steps grid; with dynamic (N up to 8) they do not."""
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25])
    for schedule, on_grid in (("fixed", True), ("dynamic", False)):
        m = make(schedule=schedule, n_steps=4)
        rec = _Recorder()
        m.student.register_forward_hook(rec, with_kwargs=True)
        hits = []
        for seed in range(5):
            rec.calls.clear()
            torch.manual_seed(seed)
            m.loss("student", class_batch(64, seed=seed), 0)
            anchor_t = [c for c in rec.calls if bool((c[2] == 0).all())][0][1]
            hits.append(bool((anchor_t[:, None] - grid).abs().min(1).values.max() < 1e-6))
        assert all(hits) if on_grid else not all(hits)
