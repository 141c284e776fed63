"""cd's label drop (cond_drop): dropped rows reach student, EMA target and teacher as the null label -1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _fixtures import make_batch, ring_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.base import U_LABEL_DROP
from fewstep.networks.mlp import MLP

torch.set_num_threads(1)


def cd_method(name: str = "cd", **kw):
    torch.manual_seed(0)
    teacher = ring_teacher()
    net = MLP(2, hidden=16, depth=2, use_s=False, num_classes=2).double()
    cls = get_method(name)
    m = cls(FlowMap(net, "consistency"), teacher, cls.make_config(**kw))
    # a target network unlike the student, so that a label reaching only one of them changes the loss
    with torch.no_grad():
        for p in m.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m, teacher


def labelled_batch(teacher, n: int = 64, seed: int = 1) -> Batch:
    b = make_batch(teacher, n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return dataclasses.replace(b, cond=torch.randint(0, 2, (n,), generator=g))


def test_labels_drop_exactly_the_rows_below_p() -> None:
    m, teacher = cd_method(cond_drop=0.3)
    b = labelled_batch(teacher)
    out = m.labels(b).cond
    drop = b.u[:, U_LABEL_DROP] < 0.3
    assert 0 < int(drop.sum()) < len(drop)
    assert torch.equal(out, torch.where(drop, torch.full_like(b.cond, -1), b.cond))
    assert m.labels(dataclasses.replace(b, cond=None)).cond is None  # unlabelled data: inert
    assert torch.equal(cd_method(cond_drop=0.0)[0].labels(b).cond, b.cond)


def test_dropped_rows_use_the_null_label_for_student_target_and_teacher() -> None:
    """cond_drop = 1 gives exactly the loss of the same batch labelled -1 everywhere (teacher unconditional)."""
    b = labelled_batch(ring_teacher())
    m1, _ = cd_method(cond_drop=1.0)
    m0, _ = cd_method(cond_drop=0.0)
    null = dataclasses.replace(b, cond=torch.full_like(b.cond, -1))
    l_drop = m1.loss("student", b, 0)[0]
    assert torch.allclose(l_drop, m0.loss("student", null, 0)[0], rtol=0, atol=1e-12)
    assert not torch.allclose(l_drop, m0.loss("student", b, 0)[0], rtol=0, atol=1e-6)  # the labels matter here
    # the teacher's step alone: the unconditional velocity differs from the class one on this mixture
    t = torch.full((64,), 0.5, dtype=torch.float64)
    x_t = (1 - t[:, None]) * b.x0 + t[:, None] * b.x1
    assert not torch.allclose(m0.partner(x_t, t, t - 0.25, null), m0.partner(x_t, t, t - 0.25, b), atol=1e-6)


def test_cond_drop_is_validated_and_ct_keeps_labels() -> None:
    with pytest.raises(ValueError, match="cond_drop"):
        get_method("cd").make_config(cond_drop=1.5)
    m, teacher = cd_method("ct")
    b = labelled_batch(teacher)
    assert torch.equal(m.labels(b).cond, b.cond)


def test_ct_refuses_cond_drop() -> None:
    """ct has no label drop: a config asking for one is an error, not silently ignored."""
    cls = get_method("ct")
    with pytest.raises(ValueError, match="cond_drop is cd-only"):
        cls(cd_method(cond_drop=0.0)[0].student, None, cls.make_config(cond_drop=0.1))
