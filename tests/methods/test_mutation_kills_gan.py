r"""Tests added to kill mutants of methods/_shared/gan.py (tools/mutation.py): the pooling of the bottleneck
features (at most 4x4 cells / 16 token groups, flattened), the hook that reads them (removed after each call), the
head's widths and dtype, the discriminator's accuracy log, the generator's frozen block (it restores each parameter's
own flag) and the refusal by full message.
:math:`L_D = \mathrm{mean\,softplus}(-D(x^{real}_\tau)) + \mathrm{mean\,softplus}(D(x^S_\tau))`,
:math:`L_G = \mathrm{mean\,softplus}(-D(x^S_\tau))`, :math:`x_\tau = (1-\tau)x_0 + \tau\epsilon`.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods._shared.dm import make_fake_score
from fewstep.methods._shared.gan import (
    GANHead,
    _pool,
    bottleneck,
    discriminator_loss,
    fake_features,
    gan_logits,
    generator_loss,
)
from fewstep.networks.factory import build_network
from fewstep.networks.mlp import MLP

torch.set_num_threads(1)


def _fake(dtype: torch.dtype = torch.float32) -> FlowMap:
    torch.manual_seed(0)
    return make_fake_score(FlowMap(MLP(2, hidden=6, depth=2, use_s=False, num_classes=2), "velocity")).to(dtype)


def test_pool_keeps_at_most_a_4x4_grid_or_16_token_groups_flattened() -> None:
    h2 = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(_pool(h2), h2)
    h3 = torch.arange(96.0).reshape(2, 8, 6)  # 8 tokens <= 16: kept, flattened token-major
    torch.testing.assert_close(_pool(h3), h3.reshape(2, 48))
    h3b = torch.randn(2, 32, 3)  # 32 tokens -> 16 groups of 2 consecutive tokens
    torch.testing.assert_close(_pool(h3b), h3b.reshape(2, 16, 2, 3).mean(2).reshape(2, 48))
    h4 = torch.randn(2, 3, 8, 8)  # 8x8 -> 4x4 cells of 2x2
    torch.testing.assert_close(_pool(h4), h4.reshape(2, 3, 4, 2, 4, 2).mean((3, 5)).reshape(2, 48))
    h4b = torch.randn(2, 3, 2, 8)  # 2x8 -> 2x4 (each side at most 4)
    torch.testing.assert_close(_pool(h4b), h4b.reshape(2, 3, 2, 4, 2).mean(4).reshape(2, 24))
    h4c = torch.randn(2, 5, 3, 3)  # 3x3 kept
    torch.testing.assert_close(_pool(h4c), h4c.reshape(2, 45))


def test_bottleneck_refusal_by_message() -> None:
    msg = ("the GAN head reads the bottleneck of an mlp, unet or dit backbone; got Linear "
           "(set method.cfg.gan_weight=0)")
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        bottleneck(nn.Linear(2, 2))


def _site_output(fake: FlowMap, site: nn.Module, x: torch.Tensor, tau: torch.Tensor,
                 cond: torch.Tensor | None) -> torch.Tensor:
    """The output of ``site`` during one explicit forward of the fake score at (x, τ, c)."""
    seen = []
    h = site.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        fake.velocity(x, tau, cond)
    finally:
        h.remove()
    return seen[-1]


def test_features_are_the_labelled_bottleneck_output_and_the_hook_is_removed() -> None:
    fake = _fake()
    head = GANHead(fake)
    site = bottleneck(fake.net)
    assert site is fake.net.net[-2] and isinstance(site, nn.SiLU)
    x, tau, c = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, -1, 0, 1])
    feats = fake_features(fake, x, tau, c)
    ref = _site_output(fake, site, x, tau, c)
    torch.testing.assert_close(feats, ref)  # (B, C) as is, at the labels given
    assert float((feats - _site_output(fake, site, x, tau, None)).abs().max()) > 1e-4  # the labels matter
    torch.testing.assert_close(gan_logits(fake, head, x, tau, c), head(ref))
    assert len(site._forward_hooks) == 0  # the reading hook is gone after each call
    fake_features(fake, x, tau, c)
    assert len(site._forward_hooks) == 0


def test_bottleneck_sites_of_unet_and_dit_and_the_head_widths() -> None:
    """U-Net: the last of the three middle blocks (a ResBlock, not the attention block before it); DiT: the last
    transformer block; features are their outputs pooled (at most 4x4 cells / 16 token groups) and flattened; the
    head maps them to a hidden width of the bottleneck's channels (maps) or features (tokens)."""
    for kind, shape, opts in (("unet", (1, 8, 8), {"channel_mult": [1, 2]}),
                              ("dit", (1, 8, 8), {"patch_size": 4, "heads": 2})):
        torch.manual_seed(1)
        net = build_network(kind, shape, num_classes=3, use_s=False, hidden=16, depth=2, emb_dim=8, options=opts)
        fake = FlowMap(net, "velocity")
        site = bottleneck(net)
        if kind == "unet":
            assert len(net.mid) == 3 and site is net.mid[2] and site is not net.mid[1]
        else:
            assert site is net.blocks[-1] and site is not net.blocks[0]
        x, tau, c = torch.randn(3, *shape), torch.rand(3), torch.tensor([0, 2, -1])
        out = _site_output(fake, site, x, tau, c)
        feats = fake_features(fake, x, tau, c)
        torch.testing.assert_close(feats, _pool(out))
        head = GANHead(fake)
        width = out.shape[1] if out.dim() == 4 else out.shape[-1]
        assert (head.mlp[0].in_features, head.mlp[0].out_features, head.mlp[2].in_features) == (
            feats.shape[-1], width, width)
        assert feats.shape[-1] != width  # the spatial cells / token groups are kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_is_linear_silu_linear_in_the_fake_dtype(dtype: torch.dtype) -> None:
    fake = _fake(dtype)
    head = GANHead(fake)
    c = fake_features(fake, torch.zeros(1, 2, dtype=dtype), torch.full((1,), 0.5, dtype=dtype), None).shape[-1]
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.SiLU, nn.Linear]
    assert (head.mlp[0].in_features, head.mlp[0].out_features, head.mlp[2].in_features) == (c, c, c)
    assert head.mlp[2].out_features == 1
    assert all(p.dtype == dtype for p in head.parameters())
    f = torch.randn(4, c, dtype=dtype)
    torch.testing.assert_close(head(f), head.mlp[2](F.silu(head.mlp[0](f)))[:, 0])
    assert head(f).shape == (4,)


def test_discriminator_accuracy_log_and_terms() -> None:
    """gan_d_acc = (share of real rows with D > 0 + share of student rows with D < 0) / 2, from the same draws."""
    fake = _fake()
    head = GANHead(fake)
    g = torch.Generator().manual_seed(2)
    xr, xs = torch.randn(32, 2, generator=g) + 1.0, torch.randn(32, 2, generator=g) - 1.0
    tr, ts = torch.rand(32, generator=g), torch.rand(32, generator=g)
    c = torch.randint(0, 2, (32,), generator=g)
    torch.manual_seed(7)
    er, es = torch.randn_like(xr), torch.randn_like(xs)  # the draws discriminator_loss makes after this seed
    with torch.no_grad():  # shift the logits so both signs occur on both sets (60 % of them positive)
        both = torch.cat([gan_logits(fake, head, (1 - tr[:, None]) * xr + tr[:, None] * er, tr, c),
                          gan_logits(fake, head, (1 - ts[:, None]) * xs + ts[:, None] * es, ts, c)])
        head.mlp[2].bias -= both.quantile(0.4)
    torch.manual_seed(7)
    loss, logs = discriminator_loss(fake, head, xr, xs, tr, ts, c)
    d_r = gan_logits(fake, head, (1 - tr[:, None]) * xr + tr[:, None] * er, tr, c)
    d_s = gan_logits(fake, head, (1 - ts[:, None]) * xs + ts[:, None] * es, ts, c)
    acc = 0.5 * (float((d_r > 0).double().mean()) + float((d_s < 0).double().mean()))
    assert 0.0 < float((d_r > 0).double().mean()) < 1.0 and 0.0 < float((d_s < 0).double().mean()) < 1.0
    assert float((d_r > 0).double().mean()) != float((d_s < 0).double().mean())  # the two shares differ
    assert logs["gan_d_acc"] == pytest.approx(acc, abs=1e-12)
    assert logs["gan_d_fake"] == pytest.approx(float(F.softplus(d_s).mean()), rel=1e-6)
    assert logs["gan_d_real"] == pytest.approx(float(F.softplus(-d_r).mean()), rel=1e-6)
    torch.testing.assert_close(loss, F.softplus(-d_r).mean() + F.softplus(d_s).mean())


def test_generator_block_restores_each_flag_and_reaches_the_sample() -> None:
    """Inside L_G the fake and head are frozen; afterwards every parameter has its own earlier flag back (a frozen
    one stays frozen); the loss is mean softplus(-D) at the re-noised sample, its gradient into x only."""
    fake = _fake()
    head = GANHead(fake)
    head.mlp[0].bias.requires_grad_(False)
    before = [p.requires_grad for p in [*fake.parameters(), *head.parameters()]]
    x = torch.randn(8, 2, requires_grad=True)
    tau = torch.rand(8)
    torch.manual_seed(3)
    lg = generator_loss(fake, head, x, tau, None)
    assert [p.requires_grad for p in [*fake.parameters(), *head.parameters()]] == before
    assert head.mlp[0].bias.requires_grad is False
    torch.manual_seed(3)
    eps = torch.randn_like(x)
    want = F.softplus(-gan_logits(fake, head, (1 - tau[:, None]) * x + tau[:, None] * eps, tau, None)).mean()
    torch.testing.assert_close(lg, want)
    lg.backward()
    assert x.grad is not None and all(p.grad is None for p in [*fake.parameters(), *head.parameters()])
