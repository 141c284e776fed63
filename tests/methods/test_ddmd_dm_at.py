"""Decoupled DMD's ``dm_at`` option: with ``final`` the DM term acts on the final anchor, CA on the random one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from _fixtures import class_batch, ring_teacher
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods.base import U_S, Batch

torch.set_num_threads(1)


def make(**kw: object) -> nn.Module:
    cls = get_method("ddmd")
    torch.manual_seed(7)  # identical weights for every configuration
    return cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(guidance=3.0, n_steps=4, **kw))


def flat_grad(m: nn.Module, loss: Tensor) -> Tensor:
    m.student.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in m.student.parameters()]
    )


def method_grad(m: nn.Module, b: Batch) -> Tensor:
    torch.manual_seed(0)
    loss, _ = m.loss("student", b, 0)
    return flat_grad(m, loss)


def test_ddmd_dm_term_acts_at_final_anchor() -> None:
    """DM only: the gradient is L_DM's at anchor(final=True) and differs from the random-anchor gradient."""
    b = class_batch(64, seed=11)
    m = make(dm_at="final", ca_weight=0.0)
    g = method_grad(m, b)
    torch.manual_seed(0)
    a = m.anchor(b, grad=True, final=True)
    loss, _, _ = m.dm_term(a.x0, a.sigma, b.u[:, U_S], b.cond)
    ref = flat_grad(m, loss)
    torch.testing.assert_close(g, ref, atol=1e-6 * float(ref.norm()) + 1e-10, rtol=1e-5)
    g_every = method_grad(make(dm_at="every", ca_weight=0.0), b)
    assert float((g - g_every).norm()) > 1e-2 * float(g_every.norm())


def test_ddmd_ca_term_stays_at_random_anchor() -> None:
    """CA only: identical gradients under both settings."""
    b = class_batch(64, seed=12)
    g_final = method_grad(make(dm_at="final", dm_weight=0.0), b)
    g_every = method_grad(make(dm_at="every", dm_weight=0.0), b)
    assert float(g_every.norm()) > 1e-8
    torch.testing.assert_close(g_final, g_every, atol=1e-6 * float(g_every.norm()) + 1e-10, rtol=1e-5)
