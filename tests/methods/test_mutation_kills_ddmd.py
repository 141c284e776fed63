r"""Tests added to kill mutants of methods/ddmd.py (tools/mutation.py): the student loss against its equation.

:math:`L = w_{DM}L_{DM} + w_{CA}L_{CA}` at the backward-simulated anchor taken with gradient; rebuilt from the
anchor and the shared CA/DM loss (defined and tested in methods/_shared/ca_dm.py and test_ddmd.py) in the same
random order, so the comparison is exact, gradients included.
"""

from __future__ import annotations

import pytest
import torch

from _fixtures import class_batch, ring_teacher, student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import ca_loss, dm_loss, dm_terms, normaliser, renoise, renoise_time, teacher_x0

torch.set_num_threads(1)


def test_ddmd_student_loss_is_the_ca_dm_loss_at_a_grad_anchor() -> None:
    cls = get_method("ddmd")
    torch.manual_seed(3)
    m = cls(student_net(param="velocity"), ring_teacher(), cls.make_config(guidance=3.0, n_steps=2))
    b = class_batch(24, seed=5)
    torch.manual_seed(8)
    loss, logs = m.loss("student", b, 0)
    torch.manual_seed(8)
    ref, ref_logs = m.ca_dm_loss(m.anchor(b, grad=True), b)
    torch.testing.assert_close(loss, ref)
    assert loss.requires_grad
    g = torch.autograd.grad(loss, list(m.student.parameters()))
    g_ref = torch.autograd.grad(ref, list(m.student.parameters()))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r)
    assert sum(float(a.abs().sum()) for a in g) > 0
    assert logs["loss"] == pytest.approx(float(ref), rel=1e-6)
    assert {k: v for k, v in logs.items() if k != "loss"} == pytest.approx(ref_logs, rel=1e-6)


# ---------------------------------------------------------------- methods/_shared/ca_dm.py (CADMMethod)
def _ddmd(**kw: object) -> torch.nn.Module:
    cls = get_method("ddmd")
    torch.manual_seed(3)
    return cls(student_net(param="velocity"), ring_teacher(), cls.make_config(**kw))


def test_bad_renoise_schedule_message() -> None:
    with pytest.raises(ValueError, match=r"^config key ca_renoise='late' is not a re-noise schedule; "
                       r"expected 'uniform' or 'uniform_capped'$"):
        _ddmd(ca_renoise="late")


def test_dm_term_is_the_unguided_dmd2_loss_on_the_configured_range() -> None:
    m = _ddmd(guidance=3.0, t_min=0.1, t_max=0.4, norm_floor=0.05)
    g = torch.Generator().manual_seed(1)
    x0, sigma, u = torch.randn(12, 2, generator=g), torch.rand(12, generator=g), torch.rand(12, generator=g)
    cond = torch.randint(0, 2, (12,), generator=g)
    torch.manual_seed(4)
    loss, gr, n = m.dm_term(x0, sigma, u, cond)
    tau = renoise_time(u, "uniform", sigma, 0.1, 0.4)
    torch.manual_seed(4)
    x0_real, x0_fake = dm_terms(m.teacher, m.fake, x0, tau, cond, 1.0)
    ref, g_ref = dm_loss(x0, x0_real, x0_fake, 0.05, "dmd2")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gr, g_ref)
    torch.testing.assert_close(n, normaliser(x0_real, x0, 0.05))


class _LabelRecorder(torch.nn.Module):
    """A teacher with velocity 0 that records the labels it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.conds: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                guidance: float = 1.0) -> torch.Tensor:
        self.conds.append(cond)
        return torch.zeros_like(x)


def test_ca_term_zero_without_labels_and_null_label_for_uncond() -> None:
    m = _ddmd(guidance=3.0, ca_norm="separate", t_max=0.6)
    x0 = torch.randn(6, 2, requires_grad=True)
    sigma, u = torch.full((6,), 0.7), torch.rand(6)
    zero = m.ca_term(x0, sigma, u, None)
    assert float(zero) == 0.0 and zero.requires_grad
    rec = _LabelRecorder()
    m.teacher = rec
    cond = torch.tensor([0, 1, 1, 0, 1, 0])
    m.ca_term(x0, sigma, u, cond)
    assert rec.conds[0] is not None and torch.equal(rec.conds[0], cond)
    assert rec.conds[1] is not None and torch.equal(rec.conds[1], torch.full_like(cond, -1))


def test_ca_term_dm_normaliser_is_n_dm() -> None:
    m = _ddmd(guidance=2.5, ca_norm="dm", t_max=0.6, norm_floor=0.05)
    g = torch.Generator().manual_seed(2)
    x0, u = torch.randn(8, 2, generator=g), torch.rand(8, generator=g)
    sigma, cond = torch.full((8,), 0.8), torch.randint(0, 2, (8,), generator=g)
    with pytest.raises(ValueError, match=r"^ca_norm='dm' needs the DM normaliser n_dm$"):
        m.ca_term(x0, sigma, u, cond)
    n_dm = torch.full((8,), 7.0)
    torch.manual_seed(6)
    got = m.ca_term(x0, sigma, u, cond, n_dm)
    tau = renoise_time(u, m.config.ca_renoise, sigma, 0.02, 0.6)
    torch.manual_seed(6)
    x_tau = renoise(x0, tau, torch.randn_like(x0))
    x0_c = teacher_x0(m.teacher, x_tau, tau, cond)
    x0_u = teacher_x0(m.teacher, x_tau, tau, torch.full_like(cond, -1))
    torch.testing.assert_close(got, ca_loss(x0, x0_c, x0_u, 1.5, 0.05, n_dm))
