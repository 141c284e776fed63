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
