r"""ct's batch velocity (``velocity="batch"``): the stable-target-field estimate of the marginal velocity.

:math:`\hat v(x_t) = (x_t - \sum_j w_j x_0^j)/t`, :math:`w_j \propto \mathcal N(x_t; (1-t)x_0^j, t^2 I)` over the
batch's data, and the ct partner :math:`x_{t'} = x_t - (t-t')\hat v`.
"""

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


def _by_hand(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The posterior mean of x0 under the batch's data, one row at a time with explicit Gaussian densities."""
    out = []
    for i in range(len(x_t)):
        ti = float(t[i])
        logp = torch.stack([torch.distributions.Normal((1 - ti) * x0[j], ti).log_prob(x_t[i]).sum()
                            for j in range(len(x0))])
        w = torch.exp(logp - logp.max())
        x0_hat = (w[:, None] * x0).sum(0) / w.sum()
        out.append((x_t[i] - x0_hat) / ti)
    return torch.stack(out)


def test_batch_velocity_is_the_posterior_mean_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.45, 0.7, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(batch_velocity(x_t, t, x0), _by_hand(x_t, t, x0))


def test_one_row_is_the_conditional_velocity() -> None:
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
    t = torch.tensor([0.6])
    torch.testing.assert_close(batch_velocity((1 - t) * x0 + t * x1, t, x0), x1 - x0, atol=1e-5, rtol=1e-5)


def test_labels_restrict_the_weights_to_their_class() -> None:
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)
    t = torch.rand(12, generator=g) * 0.8 + 0.2
    cond = torch.tensor([0, 1] * 6)
    v = batch_velocity(x_t, t, x0, cond)
    for c in (0, 1):
        k = cond == c
        torch.testing.assert_close(v[k], batch_velocity(x_t[k], t[k], x0[k]))


@pytest.mark.parametrize("t", [0.3, 0.6, 1.0])
def test_batch_velocity_tends_to_the_marginal_velocity(smooth, t: float) -> None:
    """With 2000 reference points its error is a small fraction of the conditional velocity's (5-25x here)."""
    b = batch64(smooth, 2000, 3)
    tt = torch.full((2000,), t, dtype=torch.float64)
    x_t = (1 - t) * b.x0 + t * b.x1
    v = smooth.velocity(x_t, tt)
    err_batch = float((batch_velocity(x_t, tt, b.x0) - v).pow(2).sum(1).mean())
    err_cond = float((b.x1 - b.x0 - v).pow(2).sum(1).mean())
    assert err_batch < 0.1 * err_cond, (err_batch, err_cond)


def test_ct_partner_is_an_euler_step_of_the_batch_velocity(smooth) -> None:
    """The ct loss at the exact flow map: the partner is x_t - (t - t') v_hat, so the loss is far below the
    conditional partner's at the same N and matches the equation written out."""
    b = batch64(smooth, 512, 4)
    cls = get_method("ct")
    losses = {}
    for vel in ("conditional", "batch"):
        m = cls(FlowMap(ExactNet(smooth, tol=1e-10), "consistency"), None,
                cls.make_config(distance="l2", n_steps=16, target_ema=0.0, velocity=vel))
        losses[vel] = float(m.loss("student", b, 0)[0])
        t, tp = m.times(b.u[:, 0], 0)
        x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
        part = m.partner(x_t, t, tp, b)
        want = x_t - (t - tp)[:, None] * (batch_velocity(x_t, t, b.x0) if vel == "batch" else b.x1 - b.x0)
        torch.testing.assert_close(part, want)
    assert losses["batch"] < 0.1 * losses["conditional"], losses


def test_unknown_velocity_is_refused() -> None:
    with pytest.raises(ValueError, match="velocity"):
        get_method("ct").make_config(velocity="teacher")
