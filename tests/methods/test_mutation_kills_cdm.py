r"""Tests added to kill mutants of methods/cdm.py (tools/mutation.py): the student loss against its equation.

:math:`L = w_{CA}L_{CA} + w_{DM}L_{DM} + w_{CDM}L_{DM}(f_{\sigma_s\to0}(x_s))`, :math:`\sigma_s` from column U_AUX
on U[t_min, t_max], the DM term re-noised from column U_CORNER, :math:`x_s` the Euler or Gaussian off-trajectory
point; rebuilt from the method's anchor and CA/DM terms (defined and tested in the shared modules) in the same
random order, so the comparison is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _fixtures import class_batch, ring_teacher, student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import dynamic_schedule
from fewstep.methods.base import U_AUX, U_CORNER

torch.set_num_threads(1)


def make(**kw: object) -> nn.Module:
    cls = get_method("cdm")
    torch.manual_seed(7)
    return cls(student_net(param="velocity"), ring_teacher(), cls.make_config(guidance=3.0, **kw))


@pytest.mark.parametrize(("perturbation", "weight", "renoise"), [("euler", 1.0, "uniform"),
                                                                  ("gaussian", 2.5, "uniform"),
                                                                  ("euler", 2.5, "uniform_capped")])
def test_student_loss_is_the_cdm_equation(perturbation: str, weight: float, renoise: str) -> None:
    """``uniform_capped`` DM re-noising: the off-trajectory DM term is re-noised below its own sigma_s."""
    m = make(perturbation=perturbation, cdm_weight=weight, t_min=0.05, t_max=0.9, dm_renoise=renoise)
    b = class_batch(48, seed=3)
    torch.manual_seed(11)
    loss, logs = m.loss("student", b, 0)
    torch.manual_seed(11)
    a = m.anchor(b, grad=True)
    base, _ = m.ca_dm_loss(a, b)
    sigma_s = 0.05 + 0.85 * b.u[:, U_AUX]
    if perturbation == "euler":
        x_s = a.x + (sigma_s - a.sigma)[:, None] * a.velocity
    else:
        x_s = (1 - sigma_s)[:, None] * a.x0 + sigma_s[:, None] * torch.randn_like(a.x0)
    x0_s = m.student(x_s.detach(), sigma_s, torch.zeros_like(sigma_s), cond=b.cond)
    cdm, _, _ = m.dm_term(x0_s, sigma_s, b.u[:, U_CORNER], b.cond)
    torch.testing.assert_close(loss, base + weight * cdm, rtol=1e-6, atol=1e-8)
    assert logs["cdm_loss"] == pytest.approx(float(cdm), rel=1e-6)
    assert logs["loss"] == pytest.approx(float(base + weight * cdm), rel=1e-6)


@pytest.mark.parametrize("switch", [{"off_trajectory": False}, {"cdm_weight": 0.0}])
def test_no_off_trajectory_term_when_switched_off(switch: dict) -> None:
    m = make(**switch)
    b = class_batch(32, seed=4)
    torch.manual_seed(5)
    loss, logs = m.loss("student", b, 0)
    torch.manual_seed(5)
    base, _ = m.ca_dm_loss(m.anchor(b, grad=True), b)
    torch.testing.assert_close(loss, base)
    assert "cdm_loss" not in logs and logs["loss"] == pytest.approx(float(base))


def test_off_trajectory_point_formulas_are_detached() -> None:
    m = make()
    g = torch.Generator().manual_seed(0)
    x, v, x0 = (torch.randn(5, 2, generator=g, requires_grad=True) for _ in range(3))
    sigma, sigma_s = torch.rand(5, generator=g), torch.rand(5, generator=g)
    got = m.off_trajectory_point(x, sigma, v, x0, sigma_s)
    torch.testing.assert_close(got, (x + (sigma_s - sigma)[:, None] * v).detach())
    assert not got.requires_grad
    mg = make(perturbation="gaussian")
    torch.manual_seed(3)
    got = mg.off_trajectory_point(x, sigma, v, x0, sigma_s)
    torch.manual_seed(3)
    eps = torch.randn_like(x0)
    torch.testing.assert_close(got, ((1 - sigma_s)[:, None] * x0 + sigma_s[:, None] * eps).detach())
    assert not got.requires_grad


def test_student_schedule_follows_the_config() -> None:
    torch.testing.assert_close(make(schedule="fixed", n_steps=3).student_schedule(),
                               torch.tensor([1.0, 2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    m = make(n_min=2, n_max=6, inner_min=0.3, inner_max=0.4)
    for seed in range(5):
        torch.manual_seed(seed)
        got = m.student_schedule()
        torch.manual_seed(seed)
        torch.testing.assert_close(got, dynamic_schedule(6, 0.3, 0.4, n_min=2))


def test_config_refusals_by_message() -> None:
    with pytest.raises(ValueError, match=r"^unknown CDM schedule 'cosine'; expected one of \('dynamic', 'fixed'\)$"):
        make(schedule="cosine")
    with pytest.raises(ValueError, match=r"^unknown CDM perturbation 'heun'; expected one of "
                                         r"\('euler', 'gaussian'\)$"):
        make(perturbation="heun")
    for n_min, n_max in ((0, 3), (4, 3)):
        with pytest.raises(ValueError, match=rf"^need 1 <= n_min <= n_max; got n_min={n_min}, n_max={n_max}$"):
            make(n_min=n_min, n_max=n_max)
    for lo, hi in ((0.0, 0.5), (0.6, 0.5), (0.3, 1.0)):
        with pytest.raises(ValueError, match=rf"^need 0 < inner_min <= inner_max < 1; got \({lo}, {hi}\)$"):
            make(inner_min=lo, inner_max=hi)
    make(n_min=1, n_max=1)  # boundaries accepted
    make(n_min=3, n_max=3, inner_min=0.5, inner_max=0.5)

