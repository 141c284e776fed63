"""DMD2's optional GAN head: off by default, its two losses equal their equations, gradients flow only where the
equations say, the discriminator learns to separate and its generator gradient points from fake to real."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _fixtures import class_batch, small_teacher, student_net
from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.dm import make_fake_score, renoise
from fewstep.methods._shared.gan import (
    GANHead,
    bottleneck,
    discriminator_loss,
    fake_features,
    gan_logits,
    generator_loss,
)
from fewstep.networks.factory import build_network

torch.set_num_threads(1)


def _dmd2(**cfg: float) -> nn.Module:
    torch.manual_seed(0)
    cls = get_method("dmd2")
    return cls(student_net(), small_teacher(), cls.make_config(fake_updates=1, **cfg))


def _data_batch(n: int = 64, seed: int = 0) -> object:
    b = class_batch(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b.x0 = small_teacher().sample(n, cond=b.cond, generator=g)
    return b


def test_gan_off_by_default_and_loss_unchanged() -> None:
    m = _dmd2()
    assert m.config.gan_weight == 0.0 and m.gan_head is None and not type(m).uses_data(m.config)
    assert set(m.trainable()) == {"student", "fake"} and m.trainable()["fake"] is m.fake
    b = class_batch()
    torch.manual_seed(3)
    loss, logs = m.student_loss(b, 0)
    torch.manual_seed(3)
    ref, _ = m.dm_student_loss(b)
    assert float(loss) == float(ref) and "gan_g" not in logs


def test_head_on_the_bottleneck_of_each_backbone() -> None:
    for kind, shape, opts in (("mlp", (2,), {}), ("unet", (1, 8, 8), {"channel_mult": [1, 2]}),
                              ("dit", (1, 8, 8), {"patch_size": 4, "heads": 2})):
        net = build_network(kind, shape, num_classes=3, use_s=False, hidden=16, depth=1, emb_dim=8, options=opts)
        fake = FlowMap(net, "velocity")
        head = GANHead(fake)
        x = torch.randn(5, *shape)
        tau = torch.rand(5)
        feats = fake_features(fake, x, tau, torch.tensor([0, 1, 2, -1, 0]))
        assert feats.shape == (5, head.mlp[0].in_features)
        assert gan_logits(fake, head, x, tau, None).shape == (5,)
    with pytest.raises(ValueError, match="bottleneck of an mlp, unet or dit"):
        bottleneck(nn.Linear(2, 2))


def test_losses_equal_their_equations() -> None:
    m = _dmd2(gan_weight=0.1)
    fake, head = m.fake, m.gan_head
    g = torch.Generator().manual_seed(4)
    xr, xs = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    tr, ts, c = torch.rand(16, generator=g), torch.rand(16, generator=g), torch.randint(0, 2, (16,), generator=g)
    torch.manual_seed(9)
    loss, logs = discriminator_loss(fake, head, xr, xs, tr, ts, c)
    torch.manual_seed(9)
    er, es = torch.randn_like(xr), torch.randn_like(xs)  # the same noise draws, in the same order
    d_r = gan_logits(fake, head, (1 - tr[:, None]) * xr + tr[:, None] * er, tr, c)
    d_s = gan_logits(fake, head, (1 - ts[:, None]) * xs + ts[:, None] * es, ts, c)
    want = F.softplus(-d_r).mean() + F.softplus(d_s).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert logs["gan_d_real"] == pytest.approx(float(F.softplus(-d_r).mean()), rel=1e-6)
    torch.manual_seed(9)
    lg = generator_loss(fake, head, xs, ts, c)
    torch.manual_seed(9)
    d = gan_logits(fake, head, renoise(xs, ts, torch.randn_like(xs)), ts, c)
    assert float(lg) == pytest.approx(float(F.softplus(-d).mean()), rel=1e-6)
    # a head that outputs 0: D = 1/2 everywhere, L_D = 2 log 2, L_G = log 2
    for p in head.parameters():
        nn.init.zeros_(p)
    assert float(discriminator_loss(fake, head, xr, xs, tr, ts, c)[0]) == pytest.approx(2 * math.log(2), rel=1e-6)
    assert float(generator_loss(fake, head, xs, ts, c)) == pytest.approx(math.log(2), rel=1e-6)


def bottleneck_params(fake: nn.Module) -> list[nn.Parameter]:
    """Parameters of the MLP fake score's layers up to its bottleneck (the last hidden activation)."""
    return [p for layer in fake.net.net[:-1] for p in layer.parameters()]


def test_gradient_paths() -> None:
    m = _dmd2(gan_weight=0.1)
    fake, head = m.fake, m.gan_head
    xs = torch.randn(16, 2, requires_grad=True)
    tau = torch.rand(16)
    generator_loss(fake, head, xs, tau, None).backward()
    assert xs.grad is not None and float(xs.grad.abs().sum()) > 0
    assert all(p.grad is None for p in [*fake.parameters(), *head.parameters()])  # D is not trained by L_G
    assert all(p.requires_grad for p in [*fake.parameters(), *head.parameters()])  # and stays trainable
    xs.grad = None
    discriminator_loss(fake, head, torch.randn(16, 2), xs, tau, tau, None)[0].backward()
    assert xs.grad is None  # the student is not trained by L_D
    assert all(p.grad is not None for p in head.parameters())
    # the fake score's network is the discriminator's encoder: L_D trains it too (up to the bottleneck)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bottleneck_params(fake))
    assert isinstance(bottleneck(fake.net), nn.SiLU)


def test_discriminator_separates_and_generator_pulls_toward_real() -> None:
    torch.manual_seed(0)
    fake = make_fake_score(student_net(num_classes=None))
    head = GANHead(fake)
    opt = torch.optim.Adam([*fake.parameters(), *head.parameters()], lr=3e-3)
    real = torch.tensor([2.0, 0.0]) + 0.2 * torch.randn(256, 2)
    gen = torch.tensor([-2.0, 0.0]) + 0.2 * torch.randn(256, 2)
    tau = torch.full((256,), 0.1)
    first = None
    for _ in range(150):
        loss, logs = discriminator_loss(fake, head, real, gen, tau, tau, None)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2 * first and logs["gan_d_acc"] > 0.95
    x = gen.clone().requires_grad_(True)
    generator_loss(fake, head, x, tau, None).backward()
    assert float(-x.grad[:, 0].mean()) > 0  # descent moves the student's samples toward the real mode (+x)


def test_dmd2_with_gan_trains_head_with_fake_and_refuses_bad_input() -> None:
    m = _dmd2(gan_weight=0.1, gan_disc_weight=0.5)
    assert type(m).uses_data(m.config)
    fake_params = list(m.trainable()["fake"].parameters())
    assert {id(p) for p in m.gan_head.parameters()} <= {id(p) for p in fake_params}
    b = _data_batch()
    loss, logs = m.fake_loss(b)
    assert {"gan_d_real", "gan_d_fake", "gan_d_acc", "fake_loss"} <= set(logs)
    assert float(loss) == pytest.approx(logs["fake_loss"] + 0.5 * (logs["gan_d_real"] + logs["gan_d_fake"]), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in m.gan_head.parameters())
    s_loss, s_logs = m.student_loss(b, 0)
    assert "gan_g" in s_logs and float(s_loss) == pytest.approx(s_logs["dm_loss"] + 0.1 * s_logs["gan_g"], rel=1e-5)
    with pytest.raises(ValueError, match="needs real data batches"):
        m.fake_loss(class_batch())
    cls = get_method("dmd2")
    with pytest.raises(ValueError, match="fake_split = 1"):
        cls(student_net(), small_teacher(), cls.make_config(gan_weight=0.1, fake_split=2))
    with pytest.raises(ValueError, match="must be >= 0"):
        cls(student_net(), small_teacher(), cls.make_config(gan_weight=-1.0))


def test_pooled_features_keep_the_spatial_layout() -> None:
    """Two maps with equal channel means but mirrored layouts give different features (a global mean would not);
    large maps are pooled to at most GRID x GRID cells, tokens to at most GRID² groups."""
    from fewstep.methods._shared.gan import GRID, _pool

    h = torch.zeros(1, 2, 4, 4)
    h[:, :, :, :2] = 1.0
    assert not torch.equal(_pool(h), _pool(h.flip(-1)))
    assert _pool(torch.randn(3, 5, 16, 16)).shape == (3, 5 * GRID * GRID)
    assert _pool(torch.randn(3, 64, 7)).shape == (3, GRID * GRID * 7)
    assert _pool(torch.randn(3, 9)).shape == (3, 9)


def test_generator_term_trains_the_student() -> None:
    """The student step's gradient is the DM term's plus gan_weight times the generator term's, which reaches the
    student's parameters through its samples (a detached sample would leave the DM gradient alone)."""
    from fewstep.methods._shared.dm import renoise_time
    from fewstep.methods.base import U_SELECT

    m = _dmd2(gan_weight=0.3)
    b, params = _data_batch(), list(m.student.parameters())

    def grads(loss: torch.Tensor, retain: bool = False) -> list[torch.Tensor]:
        gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]

    torch.manual_seed(8)
    got = grads(m.student_loss(b, 0)[0])
    torch.manual_seed(8)  # the same draws in the same order: anchor, DM re-noise, GAN re-noise
    a = m.anchor(b, grad=True)
    dm, _ = m.dm_student_loss(b, a)
    tau = renoise_time(b.u[:, U_SELECT], "uniform", t_min=m.config.t_min, t_max=m.config.t_max)
    g = generator_loss(m.fake, m.gan_head, a.x0, tau, b.cond)
    g_dm, g_gan = grads(dm, retain=True), grads(g)
    assert sum(float(x.abs().sum()) for x in g_gan) > 0
    for x, y, z in zip(got, g_dm, g_gan, strict=True):
        torch.testing.assert_close(x, y + 0.3 * z, rtol=1e-5, atol=1e-7)


def test_bottleneck_refusals_are_one_line() -> None:
    from fewstep.networks.mlp import MLP

    with pytest.raises(ValueError, match=r"^the GAN head needs an mlp with a hidden layer \(student.depth >= 1\)$"):
        bottleneck(MLP(2, hidden=8, depth=0))

    class Skips(MLP):
        def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return torch.zeros_like(x)

    with pytest.raises(ValueError, match=r"^the GAN head's bottleneck SiLU of Skips did not run in the fake score's "
                       r"forward pass$"):
        fake_features(FlowMap(Skips(2, hidden=8, depth=1), "velocity"), torch.zeros(2, 2), torch.ones(2), None)
