r"""Tests added to kill mutants of methods/base.py (tools/mutation.py): the one label dropout
:math:`c' = -1` where :math:`u < p` (else c), the Method contract (config default and type check, teacher
requirement, the frozen unregistered teacher, parameterization refusal, frozen copy, pair classes, the default
hooks) and the teacher velocity without gradient in x's dtype. Every refusal is matched by its full message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import LinearProbe
from fewstep.core.flowmap import FlowMap
from fewstep.methods.base import Batch, Method, MethodConfig, drop_labels

torch.set_num_threads(1)


@dataclass
class _Cfg(MethodConfig):
    alpha: float = 0.25
    beta: int = 3


class _NoTeacher(Method):
    name = "probe_no_teacher"
    config_class = _Cfg
    needs_teacher = False
    needs_data = True


class _WithTeacher(Method):
    name = "probe_teacher"
    config_class = _Cfg


class _Teacher(nn.Module):
    """A guided 'teacher' v = w * a * x + label (float64 weights): records the guidance it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.calls: list[tuple[Tensor | None, float]] = []

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        self.calls.append((cond, guidance))
        lab = torch.zeros(x.shape[0], dtype=torch.float64) if cond is None else cond.double()
        return guidance * self.a * x.double() + (lab + t.double())[:, None]


def _student(num_classes: int | None = None, param: str = "average_velocity") -> FlowMap:
    net = LinearProbe()
    if num_classes is not None:
        net.num_classes = num_classes
    return FlowMap(net, param)


# ---------------------------------------------------------------------------------------------- drop_labels
def test_drop_labels_is_minus_one_exactly_where_u_below_p() -> None:
    cond = torch.tensor([0, 1, 2, 1, 0, 2])
    u = torch.tensor([0.0, 0.29, 0.3, 0.31, 0.9, 0.2999999])
    out = drop_labels(cond, u, 0.3)
    assert out.dtype == cond.dtype
    assert out.tolist() == [-1, -1, 2, 1, 0, -1]  # u == p is kept
    assert cond.tolist() == [0, 1, 2, 1, 0, 2]  # not in place


def test_drop_labels_returns_its_input_when_none_or_p_not_positive() -> None:
    cond = torch.tensor([0, 1, 2])
    u = torch.zeros(3)  # u = 0 < p for every p > 0
    assert drop_labels(cond, u, 0.0) is cond
    assert drop_labels(cond, u, -0.5) is cond
    assert drop_labels(None, u, 0.5) is None
    assert drop_labels(cond, u, 1e-9).tolist() == [-1, -1, -1]
    assert drop_labels(cond, torch.full((3,), 0.999), 1.0).tolist() == [-1, -1, -1]


def test_batch_size_is_the_noise_rows() -> None:
    assert Batch(x1=torch.zeros(5, 2), u=torch.zeros(5, 8)).size == 5
    assert Batch(x1=torch.zeros(3, 1, 4, 4), u=torch.zeros(3, 8), x0=torch.zeros(3, 1, 4, 4)).size == 3


# ---------------------------------------------------------------------------------------------- construction
def test_default_config_and_stored_student() -> None:
    s = _student()
    m = _NoTeacher(s)
    assert type(m.config) is _Cfg and (m.config.alpha, m.config.beta) == (0.25, 3)
    assert m.student is s and m.teacher is None
    cfg = _Cfg(alpha=0.5)
    assert _NoTeacher(s, None, cfg).config is cfg


def test_wrong_config_type_is_refused() -> None:
    with pytest.raises(TypeError, match="^_NoTeacher needs a _Cfg, got MethodConfig$"):
        _NoTeacher(_student(), None, MethodConfig())


def test_teacher_requirement() -> None:
    with pytest.raises(ValueError, match="^method 'probe_teacher' needs a teacher$"):
        _WithTeacher(_student())
    assert _NoTeacher(_student()).teacher is None  # a teacher-free method needs none
    teacher = _Teacher()
    assert _WithTeacher(_student(), teacher).teacher is teacher


def test_teacher_is_frozen_in_eval_mode_and_unregistered() -> None:
    teacher = _Teacher().train()
    m = _WithTeacher(_student(), teacher)
    assert m.teacher is teacher
    assert teacher.training is False
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(not k.startswith("teacher") for k in m.state_dict())
    assert all(mod is not teacher for mod in m.modules())
    assert all(p is not teacher.a for p in m.parameters())


def test_require_parameterization() -> None:
    m = _NoTeacher(_student(param="consistency"))
    with pytest.raises(ValueError, match="^" + re.escape(
            "probe_no_teacher trains a 'average_velocity' student; got 'consistency'") + "$"):
        m.require_parameterization()
    assert _NoTeacher(_student()).require_parameterization() is None
    bare = _NoTeacher(_student())
    bare.student = nn.Linear(1, 1)  # no parameterization attribute: taken as the method's own
    assert bare.require_parameterization() is None


def test_frozen_copy_is_a_detached_deep_copy() -> None:
    m = _NoTeacher(_student())
    c = m.frozen_copy()
    assert c is not m.student
    assert all(not p.requires_grad for p in c.parameters())
    assert all(p.requires_grad for p in m.student.parameters())
    for (n1, p1), (n2, p2) in zip(m.student.named_parameters(), c.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()


def test_pair_classes() -> None:
    teacher = _Teacher()
    teacher.num_classes = 4
    assert _WithTeacher(_student(num_classes=3), teacher).pair_classes() == 4
    assert _WithTeacher(_student(num_classes=None), teacher).pair_classes() is None
    assert _WithTeacher(_student(num_classes=0), teacher).pair_classes() is None
    teacher.num_classes = 0
    assert _WithTeacher(_student(num_classes=3), teacher).pair_classes() is None
    assert _WithTeacher(_student(num_classes=3), _Teacher()).pair_classes() is None  # no attribute


def test_default_hooks() -> None:
    m = _NoTeacher(_student())
    assert _NoTeacher.uses_teacher(_Cfg()) is False and _NoTeacher.uses_data(_Cfg()) is True
    assert _WithTeacher.uses_teacher(_Cfg()) is True and _WithTeacher.uses_data(_Cfg()) is False
    assert m.trainable() == {"student": m.student} and m.trainable()["student"] is m.student
    assert m.schedule(0) == ["student"] and m.schedule(7) == ["student"]
    assert m.after_update("student", 0) is None and m.prepare({"steps": 3}) is None
    with pytest.raises(NotImplementedError, match="^_NoTeacher must implement loss\\(\\)$"):
        m.loss("student", Batch(x1=torch.zeros(2, 2), u=torch.zeros(2, 8)), 0)


def test_make_config() -> None:
    cfg = _NoTeacher.make_config(alpha=0.75)
    assert type(cfg) is _Cfg and (cfg.alpha, cfg.beta) == (0.75, 3)
    assert type(_NoTeacher.make_config()) is _Cfg
    msg = "unknown config key(s) for method 'probe_no_teacher': ['gamma', 'zeta']; valid keys: ['alpha', 'beta']"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        _NoTeacher.make_config(zeta=1, alpha=0.5, gamma=2)


# ---------------------------------------------------------------------------------------------- velocity_target
def test_velocity_target_is_the_teacher_field_without_gradient_in_x_dtype() -> None:
    teacher = _Teacher()
    m = _WithTeacher(_student(), teacher)
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)  # float32
    t = torch.tensor([0.2, 0.7])
    cond = torch.tensor([1, -1])
    v = m.velocity_target(x, t, cond, 2.5)
    expected = 2.5 * 1.5 * x.detach().double() + (cond.double() + t.double())[:, None]
    assert v.dtype == torch.float32 and not v.requires_grad
    torch.testing.assert_close(v, expected.float(), rtol=0, atol=1e-6)
    assert teacher.calls[-1][0] is cond and teacher.calls[-1][1] == 2.5
    v1 = m.velocity_target(x, t)
    torch.testing.assert_close(v1, (1.5 * x.detach().double() + t.double()[:, None]).float(), rtol=0, atol=1e-6)
    assert teacher.calls[-1] == (None, 1.0)
    # a trainable teacher parameter would not carry gradient either (computed under no_grad)
    teacher.a.requires_grad_(True)
    assert not m.velocity_target(x.detach(), t).requires_grad
