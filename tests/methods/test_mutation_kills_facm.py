r"""Tests added to kill mutants of methods/facm.py (tools/mutation.py): the CM and FM-anchor losses against their
equations on a probe network :math:`F(x,t,s,c) = a x + b t + d s + e c + k c t` (the consistency branch feeds
s = 0; JVP along :math:`(v, 1)`: :math:`a v + b + k c`), for both anchor realisations.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import random_batch, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.flowmap_helpers import consistency_time
from fewstep.methods.base import U_LABEL_DROP
from fewstep.methods.facm import FACM, FACMConfig

torch.set_num_threads(1)
N = 24


class _Probe(nn.Module):
    """F(x, t, s, c) = a x + b t + d s + e c + k c t; ``use_s`` as given (None: no attribute)."""

    def __init__(self, use_s: bool | None = None) -> None:
        super().__init__()
        self.a, self.b, self.d, self.e, self.k = (nn.Parameter(torch.tensor(v, dtype=torch.float64))
                                                  for v in (0.3, -0.7, 0.4, 0.5, 0.8))
        if use_s is not None:
            self.use_s = use_s

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.d * s + self.e * lab + self.k * lab * t)[:, None]


_CFG = dict(cond_drop=0.3, time_sampler="uniform", t_min=0.05, t_max=0.95, alpha_p=0.7, clip=0.3, norm_p=0.6,
            norm_eps=0.05, fm_weight=0.8, cos_weight=1.7, t_one_fraction=0.25)


@pytest.mark.parametrize(("use_s", "anchor", "distill", "time_weight"), [
    (True, "auto", False, True), (False, "auto", True, False), (None, "h0", True, True),
    (True, "negative_time", False, False), (False, "negative_time", True, True)])
def test_facm_loss_is_the_equation(use_s: bool | None, anchor: str, distill: bool, time_weight: bool) -> None:
    r""":math:`g = F - (v - t(a v + b + k c))`, target :math:`F - (1-(1-t)^{0.7})\,\mathrm{clip}(g, \pm 0.3)`,
    :math:`L_{CM} = \sin(\pi t/2) e/sg((e + 0.05)^{0.6})`, :math:`L_{FM} = \mathrm{mean}_d(F_{fm} - v)^2 + 1.7(1 -
    \cos)`, :math:`L = E L_{CM} + 0.8 E L_{FM}`, the FM branch F(x, t, t) (h0) or F(x, -t, -t) (negative time)."""
    teacher = two_class_teacher() if distill else None
    net = _Probe(use_s)
    m = get_method("facm")(FlowMap(net, "consistency"), teacher,
                           FACM.make_config(anchor=anchor, time_weight=time_weight, **_CFG))
    h0 = use_s is not False and anchor != "negative_time"
    assert m.anchor_mode == ("h0" if h0 else "negative_time")
    b = random_batch(N, 4)
    t = consistency_time(b.u, m.config, 0.25)
    assert bool((t == 0.95).any()) and bool((t < 0.95).any())
    cond = torch.where(b.u[:, U_LABEL_DROP] < 0.3, torch.full_like(b.cond, -1), b.cond)
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    v = teacher.velocity(x_t, t, cond) if distill else b.x1 - b.x0
    with torch.no_grad():
        F = net(x_t, t, torch.zeros_like(t), cond)
        g = F - (v - t[:, None] * (net.a * v + (net.b + net.k * cond.to(v.dtype))[:, None]))
        assert bool((g.abs() > 0.3).any()) and bool((g.abs() < 0.3).any())
        target = F - (1 - (1 - t) ** 0.7)[:, None] * g.clamp(-0.3, 0.3)
    e = ((net(x_t, t, torch.zeros_like(t), cond) - target) ** 2).mean(1)
    cm = e / (e.detach() + 0.05) ** 0.6
    if time_weight:
        cm = cm * torch.sin(math.pi * t / 2)
    fm_pred = net(x_t, t, t, cond) if h0 else net(x_t, -t, -t, cond)
    fm_mse = ((fm_pred - v) ** 2).mean(1)
    cos = (fm_pred * v).sum(1) / (fm_pred.norm(dim=1) * v.norm(dim=1))
    fm = fm_mse + 1.7 * (1 - cos)
    expected = cm.mean() + 0.8 * fm.mean()
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert set(logs) == {"loss", "cm", "fm", "cm_mse", "fm_mse"}
    for k, want in (("loss", expected), ("cm", cm.mean()), ("fm", fm.mean()), ("cm_mse", e.mean()),
                    ("fm_mse", fm_mse.mean())):
        assert logs[k] == pytest.approx(float(want), rel=1e-9), k
    gr = torch.autograd.grad(loss, [net.a, net.b, net.k])
    torch.testing.assert_close(gr, torch.autograd.grad(expected, [net.a, net.b, net.k]))


def test_anchor_branches_directly() -> None:
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    cond = torch.tensor([0, 1, -1])
    for use_s, mode in ((True, "h0"), (False, "negative_time")):
        net = _Probe(use_s)
        m = FACM(FlowMap(net, "consistency"), None, FACMConfig())
        assert m.anchor_mode == mode
        want = net(x, t, t, cond) if mode == "h0" else net(x, -t, -t, cond)
        torch.testing.assert_close(m.anchor(x, t, cond), want)


def test_h0_refused_without_s_and_config_refusals() -> None:
    with pytest.raises(ValueError, match="^" + re.escape(
            "anchor='h0' needs a backbone that sees the second time (MLP(..., use_s=True)); "
            "use anchor='negative_time' for a backbone without s") + "$"):
        FACM(FlowMap(_Probe(False), "consistency"), None, FACMConfig(anchor="h0"))
    c = FACMConfig()
    assert (c.t_min, c.logit_mean, c.logit_std, c.alpha_p, c.clip, c.norm_p, c.norm_eps, c.time_weight,
            c.fm_weight, c.cos_weight, c.anchor, c.t_one_fraction) == (
        1e-3, -0.8, 1.6, 0.5, 1.0, 0.5, 1e-3, True, 1.0, 1.0, "auto", 0.0)
    FACMConfig(t_one_fraction=0.0, fm_weight=0.0, cos_weight=0.0, norm_p=0.0)
    FACMConfig(t_one_fraction=1.0, t_min=1e-9)
    fm_msg = "fm_weight, cos_weight, norm_p must be >= 0 and norm_eps > 0"
    bad = [
        (dict(t_one_fraction=-0.1), "t_one_fraction must lie in [0, 1]; got -0.1"),
        (dict(t_one_fraction=1.1), "t_one_fraction must lie in [0, 1]; got 1.1"),
        (dict(t_min=0.0), "FACM needs t_min > 0; got t_min=0.0"),
        (dict(alpha_p=0.0), "alpha_p and clip must be positive; got 0.0, 1.0"),
        (dict(clip=0.0), "alpha_p and clip must be positive; got 0.5, 0.0"),
        (dict(fm_weight=-0.1), fm_msg), (dict(cos_weight=-0.1), fm_msg), (dict(norm_p=-0.1), fm_msg),
        (dict(norm_eps=0.0), fm_msg),
        (dict(anchor="x"), "anchor must be one of ('auto', 'negative_time', 'h0'); got 'x'"),
        (dict(logit_std=0.0), "logit_std must be positive; got 0.0"),  # the parent's checks still run
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            FACMConfig(**kw)


class _ImageProbe(_Probe):
    """The same F on (B, C, H, W) states (time and label terms broadcast over C, H, W)."""

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.d * s + self.e * lab + self.k * lab * t).view(-1, 1, 1, 1)


def test_fm_cosine_is_per_pixel_over_channels_on_images() -> None:
    r"""On (B, C, H, W) states the anchor's cosine is taken over the channels and averaged over the pixels:
    :math:`L_{FM} = \mathrm{mean}(F_{fm} - v)^2 + 1 - \mathrm{mean}_{hw}\cos_c(F_{fm}, v)` (h0 anchor, from data)."""
    net = _ImageProbe(True)
    m = FACM(FlowMap(net, "consistency"), None, FACM.make_config(**{**_CFG, "cond_drop": 0.0}))
    g = torch.Generator().manual_seed(5)
    b = random_batch(6, 5)
    b.x0, b.x1 = (torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = consistency_time(b.u, m.config, 0.25)
    x_t = (1 - t).view(-1, 1, 1, 1) * b.x0 + t.view(-1, 1, 1, 1) * b.x1
    v = b.x1 - b.x0
    fm_pred = net(x_t, t, t, b.cond)
    fm_mse = ((fm_pred - v) ** 2).flatten(1).mean(1)
    cos = ((fm_pred * v).sum(1) / (fm_pred.norm(dim=1) * v.norm(dim=1))).flatten(1).mean(1)
    _, logs = m.loss("student", b, 0)
    assert logs["fm"] == pytest.approx(float((fm_mse + 1.7 * (1 - cos)).mean()), rel=1e-9)
    assert logs["fm_mse"] == pytest.approx(float(fm_mse.mean()), rel=1e-9)
