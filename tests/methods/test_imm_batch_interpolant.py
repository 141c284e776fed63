r"""IMM's ``interpolant="batch"``: x_r is the DDIM step of x_t with the batch's posterior mean of x0,
:math:`x_r = x_t - (t-r)\hat v(x_t, t)` (:func:`fewstep.methods._shared.batch_velocity.batch_velocity`)."""

from __future__ import annotations

import pytest
import torch

from _fixtures import ExactNet
from _fixtures import make_batch as batch64
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.batch_velocity import batch_velocity
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smooth() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher([0.6, 0.4], [[-1.0, 0.5], [1.0, -0.5]],
                                  [[[0.3, 0.1], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.4]]])


@pytest.mark.parametrize("interpolant", ["conditional", "batch"])
def test_target_sees_the_interpolant(smooth, interpolant: str) -> None:
    cls = get_method("imm")
    m = cls(FlowMap(ExactNet(smooth, tol=1e-6), "average_velocity"), None,
            cls.make_config(k=2, target_ema=0.0, interpolant=interpolant))
    b = batch64(smooth, 64, 0)
    seen = {}
    m.target.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], r=args[1], s=args[2]))
    m.loss("student", b, 0)
    s, r, t = m.group_times(b.u, 64 // m.config.group_size)
    torch.testing.assert_close(seen["r"], r)
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    want = (x_t - (t - r)[:, None] * batch_velocity(x_t, t, b.x0) if interpolant == "batch"
            else (1 - r)[:, None] * b.x0 + r[:, None] * b.x1)
    torch.testing.assert_close(seen["x"], want)


def test_batch_t_min_keeps_the_conditional_interpolant_below_it(smooth) -> None:
    """``batch_t_min``: groups with t < batch_t_min take x_r = (1-r)x0 + r x1, the others the batch DDIM step."""
    cls = get_method("imm")
    m = cls(FlowMap(ExactNet(smooth, tol=1e-6), "average_velocity"), None,
            cls.make_config(k=2, target_ema=0.0, interpolant="batch", batch_t_min=0.5))
    b = batch64(smooth, 64, 1)
    seen = {}
    m.target.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    m.loss("student", b, 0)
    s, r, t = m.group_times(b.u, 64 // m.config.group_size)
    low = t < 0.5
    assert 0 < int(low.sum()) < 64
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    cond = (1 - r)[:, None] * b.x0 + r[:, None] * b.x1
    torch.testing.assert_close(seen["x"][low], cond[low])
    torch.testing.assert_close(seen["x"][~low], (x_t - (t - r)[:, None] * batch_velocity(x_t, t, b.x0))[~low])
    with pytest.raises(ValueError, match="batch_t_min"):
        cls.make_config(batch_t_min=1.5)


def test_batch_interpolant_lowers_the_loss_at_the_exact_map(smooth) -> None:
    """At the exact flow map the V-statistic's same-pair terms see x_r off x_t's trajectory; the batch step is
    close to the trajectory, so the loss is far smaller (averaged over batches)."""
    cls = get_method("imm")
    exact = FlowMap(ExactNet(smooth, tol=1e-8), "average_velocity")
    vals = {}
    for interp in ("conditional", "batch"):
        m = cls(exact, None, cls.make_config(k=2, target_ema=0.0, interpolant=interp))
        vals[interp] = sum(float(m.loss("student", batch64(smooth, 512, i), 0)[0]) for i in range(3))
    assert vals["batch"] < 0.3 * vals["conditional"], vals


def test_unknown_interpolant_is_refused() -> None:
    with pytest.raises(ValueError, match="interpolant"):
        get_method("imm").make_config(interpolant="teacher")
