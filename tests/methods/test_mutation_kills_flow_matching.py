"""Tests added to kill mutants of methods/flow_matching.py (tools/mutation.py): the loss against its equation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.base import U_FM_LABEL_DROP, U_T

torch.set_num_threads(1)


class _Probe(nn.Module):
    """A velocity 'network' v = a x + b t (+ c * label, -1 meaning no label) with learnable scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (0.3, -0.7, 0.5))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.c * lab)[:, None]


def _batch(n: int = 64) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        x1=torch.randn(n, 2, generator=g, dtype=torch.float64),
        u=torch.rand(n, 8, generator=g, dtype=torch.float64),
        x0=torch.randn(n, 2, generator=g, dtype=torch.float64) + 2.0,
        cond=torch.randint(0, 3, (n,), generator=g),
    )


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal"])
def test_loss_is_the_flow_matching_equation(sampler: str) -> None:
    r""":math:`L = E\|v(x_t, t, c') - (x_1 - x_0)\|^2`, x_t = (1-t) x0 + t x1, c' = -1 where u < cond_drop."""
    cls = get_method("flow_matching")
    cfg = cls.make_config(time_sampler=sampler, logit_mean=0.3, logit_std=0.8, cond_drop=0.4)
    net = _Probe()
    method = cls(FlowMap(net, "velocity"), None, cfg)
    b = _batch()
    u = b.u[:, U_T]
    if sampler == "uniform":
        t = u
    else:  # logit-normal: sigmoid(mean + std * Phi^{-1}(u))
        t = torch.sigmoid(0.3 + 0.8 * math.sqrt(2) * torch.erfinv(2 * u - 1))
    t = t.clamp(0, 1)
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    cond = torch.where(b.u[:, U_FM_LABEL_DROP] < 0.4, torch.full_like(b.cond, -1), b.cond)
    expected = ((net(x_t, t, t, cond) - (b.x1 - b.x0)) ** 2).mean()
    loss, logs = method.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_data_free_batch_is_refused() -> None:
    method = get_method("flow_matching")(FlowMap(_Probe(), "velocity"))
    b = _batch()
    with pytest.raises(ValueError, match=r"^flow_matching needs data batches \(x0\)$"):
        method.loss("student", Batch(x1=b.x1, u=b.u), 0)


def test_defaults() -> None:
    cfg = get_method("flow_matching").make_config()
    assert (cfg.time_sampler, cfg.logit_mean, cfg.logit_std, cfg.cond_drop) == ("uniform", 0.0, 1.0, 0.1)


def test_unconditional_batch_with_label_drop() -> None:
    """A batch without labels trains the unconditional velocity even when cond_drop > 0."""
    cls = get_method("flow_matching")
    net = _Probe()
    method = cls(FlowMap(net, "velocity"), None, cls.make_config(cond_drop=0.5))
    b = _batch()
    t = b.u[:, U_T]
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    loss, _ = method.loss("student", Batch(x1=b.x1, u=b.u, x0=b.x0), 0)
    torch.testing.assert_close(loss, ((net(x_t, t, t) - (b.x1 - b.x0)) ** 2).mean())
