"""Method.pair_classes: which labels teacher pairs carry (the one rule the reflow family and DMD share)."""

from __future__ import annotations

import pytest
import torch

from _fixtures import ring_teacher, student_net
from fewstep.methods import get_method
from fewstep.teachers import GaussianMixtureTeacher


@pytest.mark.parametrize("name", ["reflow", "dmd"])
def test_pair_classes_follow_student_and_teacher(name: str) -> None:
    cls = get_method(name)
    conditional_teacher = ring_teacher()
    k = conditional_teacher.num_classes
    assert k and k > 1
    assert cls(student_net(), conditional_teacher, cls.make_config()).pair_classes() == k
    # an unconditional student of a class-conditional teacher: unlabelled pairs
    assert cls(student_net(num_classes=None), conditional_teacher, cls.make_config()).pair_classes() is None
    # a classless teacher gives no labels even to a student built with classes
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    plain = GaussianMixtureTeacher([0.5, 0.5], means, 0.1 * torch.eye(2).expand(2, 2, 2))
    assert not getattr(plain, "num_classes", None)
    assert cls(student_net(), plain, cls.make_config()).pair_classes() is None
