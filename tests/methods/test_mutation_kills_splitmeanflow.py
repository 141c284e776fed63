r"""Tests added to kill mutants of methods/splitmeanflow.py (tools/mutation.py): the loss against its equation on a
probe network :math:`F(x,t,s,c) = a x + b t + d s + e\,c`, from data and distilled, with labels and a logit-normal
split point.
"""

from __future__ import annotations

import math

import pytest
import torch

from _probe_nets import LinearProbe as _Probe
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.base import U_AUX, U_LABEL_DROP
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
N = 32


def _teacher() -> GaussianMixtureTeacher:
    cov = torch.eye(2, dtype=torch.float64)[None].repeat(3, 1, 1) * 0.2
    return GaussianMixtureTeacher([0.3, 0.3, 0.4], [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], cov, classes=[0, 1, 2])


def _batch() -> Batch:
    g = torch.Generator().manual_seed(2)
    return Batch(x1=torch.randn(N, 2, generator=g, dtype=torch.float64),
                 u=torch.rand(N, 8, generator=g, dtype=torch.float64),
                 x0=torch.randn(N, 2, generator=g, dtype=torch.float64) + 1.0,
                 cond=torch.randint(0, 3, (N,), generator=g))


@pytest.mark.parametrize("distill", [False, True])
def test_loss_is_the_split_equation(distill: bool) -> None:
    r"""Split rows: :math:`F_{tgt} = [(t-r)F(x_t,t,r,c) + (r-s)F(x_t-(t-r)F(x_t,t,r,c),r,s,c)]/(t-s)`,
    :math:`r = s + \lambda(t-s)`, :math:`\lambda = \sigma(\Phi^{-1}(u))`; boundary rows (s = t): v;
    :math:`L = E[\Delta/(\Delta+c)^p]`; logs mse, mse_boundary, mse_split."""
    teacher = _teacher() if distill else None
    cls = get_method("splitmeanflow")
    net = _Probe()
    m = cls(FlowMap(net, "average_velocity"), teacher,
            cls.make_config(split_sampler="logit_normal", norm_p=0.5, norm_eps=0.1, cond_drop=0.3,
                            time_sampler="uniform", equal_fraction=0.3, corner_fraction=0.0))
    b = _batch()
    t, s = m.sample_times(b)
    boundary = t == s
    assert 0 < int(boundary.sum()) < N
    cond = torch.where(b.u[:, U_LABEL_DROP] < 0.3, torch.full_like(b.cond, -1), b.cond)
    assert bool((cond == -1).any()) and bool((cond >= 0).any())
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    v = teacher.velocity(x_t, t, cond) if distill else b.x1 - b.x0
    lam = torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * b.u[:, U_AUX] - 1))
    r = s + lam * (t - s)
    with torch.no_grad():
        f_tr = net(x_t, t, r, cond)
        f_rs = net(x_t - (t - r)[:, None] * f_tr, r, s, cond)
        gap = torch.where(boundary, torch.ones_like(t), t - s)[:, None]
        split = ((t - r)[:, None] * f_tr + (r - s)[:, None] * f_rs) / gap
        target = torch.where(boundary[:, None], v, split)
    delta = ((net(x_t, t, s, cond) - target) ** 2).sum(1)
    expected = (delta / (delta.detach() + 0.1) ** 0.5).mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert set(logs) == {"loss", "mse", "mse_boundary", "mse_split"}
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-9)
    assert logs["mse"] == pytest.approx(float(delta.mean()), rel=1e-9)
    assert logs["mse_boundary"] == pytest.approx(float(delta[boundary].mean()), rel=1e-9)
    assert logs["mse_split"] == pytest.approx(float(delta[~boundary].mean()), rel=1e-9)
    (g,) = torch.autograd.grad(loss, net.e)
    (g_ref,) = torch.autograd.grad(expected, net.e)
    torch.testing.assert_close(g, g_ref)


def test_split_target_passes_the_labels_to_both_jumps() -> None:
    cls = get_method("splitmeanflow")
    net = _Probe()
    m = cls(FlowMap(net, "average_velocity"), None, cls.make_config())
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.9, 0.8, 0.6, 1.0], dtype=torch.float64)
    s = torch.tensor([0.1, 0.3, 0.0, 0.0], dtype=torch.float64)
    r = s + 0.4 * (t - s)
    cond = torch.tensor([0, 1, 2, -1])
    f_tr = net(x, t, r, cond)
    f_rs = net(x - (t - r)[:, None] * f_tr, r, s, cond)
    want = ((t - r)[:, None] * f_tr + (r - s)[:, None] * f_rs) / (t - s)[:, None]
    got = m.split_target(x, t, s, r, cond)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def test_split_sampler_is_checked_by_name() -> None:
    cls = get_method("splitmeanflow")
    assert cls.make_config(split_sampler="logit_normal").split_sampler == "logit_normal"
    assert cls.make_config(split_sampler="uniform").split_sampler == "uniform"
    with pytest.raises(ValueError, match=r"^split_sampler must be 'uniform' or 'logit_normal'; got 'beta'$"):
        cls.make_config(split_sampler="beta")


@pytest.mark.parametrize(("equal", "keys"), [(1.0, {"loss", "mse", "mse_boundary"}),
                                             (0.0, {"loss", "mse", "mse_split"})])
def test_logs_name_only_the_row_kinds_present(equal: float, keys: set) -> None:
    """All rows at s = t: no mse_split (no NaN from an empty mean); no row at s = t: no mse_boundary."""
    cls = get_method("splitmeanflow")
    m = cls(FlowMap(_Probe(), "average_velocity"), None, cls.make_config(equal_fraction=equal, corner_fraction=0.0))
    _, logs = m.loss("student", _batch(), 0)
    assert set(logs) == keys
    assert all(math.isfinite(v) for v in logs.values())
