"""Tests added to kill mutants of core/flowmap.py that the older tests let survive (tools/mutation.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fewstep.core.flowmap import FlowMap, VelocityFlowMap
from fewstep.networks.mlp import MLP

torch.set_num_threads(1)


def _vel(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
    """A velocity that depends on x, t and the label: v = t x + cond (cond as a shift, 0 if None)."""
    shift = torch.zeros_like(x) if cond is None else cond[:, None].to(x.dtype).expand_as(x)
    return t[:, None] * x + shift


def test_default_parameterization_is_average_velocity() -> None:
    """FlowMap(net) is an average-velocity map: the backbone sees s' = s."""
    f = FlowMap(MLP(2, hidden=8, depth=1))
    assert f.parameterization == "average_velocity"
    t, s = torch.full((3,), 0.7), torch.full((3,), 0.2)
    torch.testing.assert_close(f.network_s(t, s), s)


def test_wrong_event_shape_is_a_clear_error() -> None:
    """An input whose event shape differs from the network's is refused with a message naming both shapes."""
    f = FlowMap(MLP(4, hidden=8, depth=1, event_shape=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"^flow-map input must have shape \(batch, 1, 2, 2\); got \(3, 4\)$"):
        f(torch.randn(3, 4), 1.0, 0.0)


def test_non_tensor_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"^flow-map input must be a tensor, got list$"):
        FlowMap(MLP(2, hidden=8, depth=1))([[0.0, 0.0]], 1.0, 0.0)


@pytest.mark.parametrize("which", ["t", "s"])
def test_bad_time_shapes_name_the_time(which: str) -> None:
    """F, forward and VelocityFlowMap name the offending time (t or s) when its shape does not match the batch."""
    x, bad = torch.randn(4, 2), torch.zeros(3)
    t, s = (bad, 0.0) if which == "t" else (1.0, bad)
    pattern = rf"^{which} must be a scalar or have shape \(4,\)"
    f = FlowMap(MLP(2, hidden=8, depth=1))
    with pytest.raises(ValueError, match=pattern):
        f.F(x, t, s)
    with pytest.raises(ValueError, match=pattern):
        VelocityFlowMap(_vel)(x, t, s)
    if which == "t":
        with pytest.raises(ValueError, match=pattern):
            VelocityFlowMap(_vel).velocity(x, bad)


def test_velocity_flowmap_is_one_euler_step_with_time_and_label() -> None:
    r""":math:`f_{t\to s}(x) = x - (t-s) v(x, t, c)` and velocity(x, t, c) = v(x, t, c), labels passed through."""
    x, cond = torch.randn(5, 2, dtype=torch.float64), torch.arange(5)
    t = torch.full((5,), 0.8, dtype=torch.float64)
    f = VelocityFlowMap(_vel)
    torch.testing.assert_close(f.velocity(x, 0.8, cond), _vel(x, t, cond))
    torch.testing.assert_close(f(x, 0.8, 0.3, cond), x - 0.5 * _vel(x, t, cond))


def test_input_is_cast_to_the_students_dtype() -> None:
    """A float64 input to a float32 student is cast (same result as the float32 input); an integer one is refused."""
    torch.manual_seed(0)
    f = FlowMap(MLP(2, hidden=8, depth=1), "velocity")
    x = torch.randn(4, 2, dtype=torch.float64)
    out = f(x, 0.9, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, f(x.float(), 0.9, 0.1))
    with pytest.raises(TypeError, match=r"^flow-map input must be a floating-point tensor, got torch.int64$"):
        f(torch.ones(4, 2, dtype=torch.long), 0.9, 0.1)


def test_forward_names_the_time_and_refuses_upward_jumps() -> None:
    """forward names t in a shape error, and a jump with s > t is refused with the offending times."""
    f = FlowMap(MLP(2, hidden=8, depth=1))
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"^t must be a scalar or have shape \(4,\)"):
        f(x, torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match=r"^s must be a scalar or have shape \(4,\)"):
        f(x, 1.0, torch.zeros(3))
    with pytest.raises(ValueError, match=r"got s > t \(t=0\.2\.\., s=0\.5\.\.\)$"):
        f(x, 0.2, 0.5)
