"""SplitMeanFlow: vanishing loss for the exact student, the FM boundary, no JVP, and a falling loss."""

from __future__ import annotations

import pytest
import torch

import fewstep.methods._shared.flowmap_base as flowmap_base
from _fixtures import exact_student, make_batch, train_and_measure
from fewstep.core.flowmap import FlowMap
from fewstep.methods.splitmeanflow import SplitMeanFlow
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.mark.parametrize("preset", ["ring8", "aniso3"])
def test_exact_student_loss_vanishes(preset: str) -> None:
    teacher = load_preset(preset).double()
    cfg = SplitMeanFlow.make_config(t_min=0.1, t_max=0.9, time_sampler="uniform", norm_p=0.0, equal_fraction=0.25)
    batch = make_batch(teacher, 12, seed=3)
    loss, logs = SplitMeanFlow(exact_student(teacher), teacher, cfg).loss("student", batch, 0)
    assert float(loss) < 1e-12 and "mse_split" in logs and "mse_boundary" in logs
    bad, _ = SplitMeanFlow(exact_student(teacher, offset=0.05), teacher, cfg).loss("student", batch, 0)
    assert float(bad) > 1e-3


def test_exact_student_loss_vanishes_with_rows_at_s_zero() -> None:
    """Rows at s = t_min = 0 (zero_fraction) and corner rows: the split target (r = lambda t) is exact there too."""
    teacher = load_preset("ring8").double()
    cfg = SplitMeanFlow.make_config(time_sampler="uniform", norm_p=0.0, equal_fraction=0.25, zero_fraction=0.5,
                                    corner_fraction=0.1)
    batch = make_batch(teacher, 16, seed=3)
    method = SplitMeanFlow(exact_student(teacher), teacher, cfg)
    t, s = method.sample_times(batch)
    assert int(((s == 0) & (t > 0)).sum()) >= 4 and bool((t == s).any())
    loss, logs = method.loss("student", batch, 0)
    assert float(loss) < 1e-10 and logs["mse_boundary"] < 1e-20
    bad, _ = SplitMeanFlow(exact_student(teacher, offset=0.05), teacher, cfg).loss("student", batch, 0)
    assert float(bad) > 1e-3


def test_split_target_is_exact_for_a_linear_in_time_average_velocity() -> None:
    """For F(x,t,s) = a + b (t + s) the split target equals F(t,s) exactly (additivity of the integral)."""

    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: None = None) -> torch.Tensor:
            return torch.stack([1.0 + 2.0 * (t + s), -0.5 + 0.3 * (t + s)], dim=1)

    m = SplitMeanFlow(FlowMap(Affine(), "average_velocity"), None, SplitMeanFlow.make_config())
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
    s, r = 0.2 * t, 0.6 * t
    assert torch.allclose(m.split_target(x, t, s, r, None), m.student.F(x, t, s), atol=1e-12)


def test_boundary_rows_are_flow_matching_on_the_teacher() -> None:
    teacher = load_preset("ring8").double()
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=32, depth=2), "average_velocity").double()
    cfg = SplitMeanFlow.make_config(equal_fraction=1.0, corner_fraction=0.0, norm_p=0.0)
    batch = make_batch(teacher, 64, seed=4)
    method = SplitMeanFlow(student, teacher, cfg)
    loss, _ = method.loss("student", batch, 0)
    t, s = method.sample_times(batch)
    assert torch.equal(t, s)
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    manual = ((student.F(x_t, t, t) - teacher.velocity(x_t, t)) ** 2).sum(1).mean()
    assert abs(float(loss) - float(manual)) < 1e-10


def test_no_jvp_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("SplitMeanFlow must not call the JVP")

    monkeypatch.setattr(flowmap_base, "jvp", forbidden)
    teacher = load_preset("ring8").double()
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=16, depth=1), "average_velocity").double()
    method = SplitMeanFlow(student, teacher, SplitMeanFlow.make_config())
    loss, _ = method.loss("student", make_batch(teacher, 32, 5), 0)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters()) and float(loss) > 0


def test_loss_falls_and_average_velocity_improves() -> None:
    before, after, first, last = train_and_measure("splitmeanflow")
    assert after < 0.5 * before
    assert last["loss"] < 0.5 * first["loss"]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="split_sampler"):
        SplitMeanFlow.make_config(split_sampler="beta")
    with pytest.raises(ValueError, match="unknown config key"):
        SplitMeanFlow.make_config(bootstrap_every=8)
