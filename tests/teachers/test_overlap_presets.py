"""The class-overlapping presets (shared3, overlap2): classes overlap at t=0 and the CFG tilt moves the classes."""

from __future__ import annotations

import torch

from fewstep.benchmarks.guided_targets import tilted_log_density
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.presets import load_preset


def _grid_mean(teacher: GaussianMixtureTeacher, c: int, w: float, box: float = 4.0, cell: float = 0.04) -> torch.Tensor:
    """Mean of the tilted density q_w(x|c) ∝ p(x|c)^w p(x)^(1-w) by quadrature on a grid."""
    axis = torch.arange(-box, box, cell, dtype=torch.float64) + cell / 2
    x = torch.cartesian_prod(axis, axis)
    q = torch.softmax(tilted_log_density(teacher, x, torch.full((x.shape[0],), c), w), 0)
    return (q[:, None] * x).sum(0)


def test_shared3_classes_share_the_centre() -> None:
    t = load_preset("shared3", conditional=True)
    assert t.num_classes == 3 and torch.allclose(t.class_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    centre = t.means.norm(dim=1) < 1e-12
    assert sorted(t.classes[centre].tolist()) == [0, 1, 2]  # every class owns a copy of the central mode
    assert torch.allclose(t.weights[centre].sum(), torch.tensor(0.4, dtype=torch.float64))
    assert load_preset("shared3").num_classes is None


def test_overlap2_classes_overlap() -> None:
    t = load_preset("overlap2", conditional=True)
    gap = float((t.means[0] - t.means[1]).norm())
    assert t.num_classes == 2 and gap <= 2 * float(t.covariances[0, 0, 0].sqrt()) + 1e-9  # 2 std apart


def test_tilt_moves_the_class_on_overlapping_presets() -> None:
    """w = 1 gives the class mean; w = 4 pushes class 0 away from the other classes (exact grid quadrature)."""
    for name, shift in (("shared3", 0.2), ("overlap2", 0.2)):
        t = load_preset(name, conditional=True)
        m1 = _grid_mean(t, 0, 1.0)
        exact = (t.weights[t.classes == 0, None] * t.means[t.classes == 0]).sum(0) / t.class_weights[0]
        torch.testing.assert_close(m1, exact, atol=1e-6, rtol=0)
        m4 = _grid_mean(t, 0, 4.0)
        away = m4 - m1
        other = (t.weights[t.classes != 0, None] * t.means[t.classes != 0]).sum(0) / (1 - t.class_weights[0])
        assert float(away.norm()) > shift and float(torch.dot(away, m1 - other)) > 0
