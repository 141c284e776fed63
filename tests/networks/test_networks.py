"""Tests of the MLP backbone and the sinusoidal embedding."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.networks.mlp import MLP, SinusoidalEmbedding

torch.set_num_threads(1)


def test_sinusoidal_embedding_values() -> None:
    r""":math:`[\sin(2\pi f_k t), \cos(2\pi f_k t)]` with f_k log-spaced in [1, max_freq]."""
    emb = SinusoidalEmbedding(8, max_freq=16.0)
    t = torch.tensor([0.0, 0.25, 0.7])
    out = emb(t)
    freqs = torch.tensor([1.0, 16 ** (1 / 3), 16 ** (2 / 3), 16.0])
    ref = torch.cat([torch.sin(2 * math.pi * t[:, None] * freqs), torch.cos(2 * math.pi * t[:, None] * freqs)], 1)
    assert out.shape == (3, 8) and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    # bounded time derivative: |d/dt emb| <= 2 pi max_freq (what keeps JVP targets bounded)
    tt = torch.linspace(0, 1, 50, requires_grad=True)
    (g,) = torch.autograd.grad(emb(tt).pow(2).sum(), tt)  # sin^2 + cos^2 = 1 per frequency: derivative 0
    assert float(g.abs().max()) < 1e-4
    jac = torch.autograd.functional.jacobian(lambda u: emb(u).sum(0), torch.tensor([0.3]))
    assert float(jac.abs().max()) <= 2 * math.pi * 16.0 + 1e-4
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)


@pytest.mark.parametrize("shape", [(2,), (5,), (1, 4, 4)])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_mlp_shapes_and_dtypes(shape: tuple[int, ...], num_classes: int | None) -> None:
    torch.manual_seed(0)
    dim = math.prod(shape)
    net = MLP(dim, hidden=16, depth=2, emb_dim=8, num_classes=num_classes, event_shape=shape)
    x, t, s = torch.randn(4, *shape), torch.rand(4), torch.rand(4)
    cond = torch.tensor([0, 1, 2, -1]) if num_classes else None
    out = net(x, t, s, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    net64 = net.double()
    assert net64(x.double(), t.double(), s.double(), cond).dtype == torch.float64
    assert torch.allclose(net64(x.double(), t.double(), s.double(), cond).float(), out, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_mlp_conditioning() -> None:
    torch.manual_seed(1)
    net = MLP(2, hidden=16, depth=2, num_classes=3)
    x, t, s = torch.randn(5, 2), torch.rand(5), torch.rand(5)
    null = net(x, t, s, torch.full((5,), -1))
    assert torch.equal(net(x, t, s, None), null)  # cond=None is the null label for every row
    lab = net(x, t, s, torch.tensor([0, 1, 2, 0, 1]))
    assert float((lab - null).abs().min()) > 0
    mixed = net(x, t, s, torch.tensor([0, -1, 2, -1, 1]))  # rows are independent
    assert torch.equal(mixed[[1, 3]], null[[1, 3]]) and torch.equal(mixed[[0, 2, 4]], lab[[0, 2, 4]])
    assert net.c_emb.num_embeddings == 4  # 3 classes + the null class
    plain = MLP(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="without num_classes"):
        plain(x, t, s, torch.zeros(5, dtype=torch.long))
    assert torch.equal(plain(x, t, s, torch.full((5,), -1)), plain(x, t, s))


@torch.no_grad()
def test_mlp_time_inputs() -> None:
    torch.manual_seed(2)
    x, t = torch.randn(4, 2), torch.rand(4)
    flow = MLP(2, hidden=16, depth=2, use_s=True)
    assert float((flow(x, t, t * 0.5) - flow(x, t, t)).abs().max()) > 0  # sees s through h = t - s
    assert torch.equal(flow(x, t, None), flow(x, t, t))  # s=None means s = t (a velocity query)
    vel = MLP(2, hidden=16, depth=2, use_s=False)
    assert torch.equal(vel(x, t, t * 0.5), vel(x, t, torch.zeros(4)))  # ignores s
    assert float((vel(x, t) - vel(x, t * 0.5)).abs().max()) > 0
    n_params = sum(p.numel() for p in MLP(2, hidden=16, depth=2, emb_dim=8, use_s=True).parameters())
    assert n_params == (2 + 16) * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2  # in = dim + 2 embeddings


def test_mlp_errors_and_gradients() -> None:
    with pytest.raises(ValueError, match="does not have 10 elements"):
        MLP(10, event_shape=(3, 3))
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        MLP(2, activation="relu6")
    net = MLP(2, hidden=8, depth=2, activation="gelu")
    x = torch.randn(3, 2, requires_grad=True)
    net(x, torch.rand(3), torch.rand(3)).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in net.parameters())


def test_embedding_frequencies_and_raw_time() -> None:
    """min_freq/max_freq set the log-spaced band; raw_time appends t and t - s; bad bands are refused."""
    from fewstep.networks.mlp import MLP, SinusoidalEmbedding

    emb = SinusoidalEmbedding(8, max_freq=4.0, min_freq=0.25)
    assert torch.allclose(emb.freqs, torch.tensor([0.25, 0.25 * 16 ** (1 / 3), 0.25 * 16 ** (2 / 3), 4.0]), rtol=1e-5)
    # with min_freq < 0.5 the lowest feature separates t = 0 from t = 1 (with min_freq = 1 it cannot)
    e = emb(torch.tensor([0.0, 1.0]))
    assert (e[0] - e[1]).abs().max() > 0.5
    with pytest.raises(ValueError, match="min_freq"):
        SinusoidalEmbedding(8, max_freq=1.0, min_freq=2.0)
    torch.manual_seed(0)
    net = MLP(2, hidden=8, depth=1, emb_dim=4, raw_time=True)
    assert net.net[0].in_features == 2 + 4 + 4 + 2
    x, t = torch.randn(3, 2), torch.rand(3)
    y = net(x, t, t * 0.5)
    assert y.shape == (3, 2) and torch.isfinite(y).all()
    # the raw inputs enter the first layer: perturbing the weight on h changes the output unless h = 0
    with torch.no_grad():
        net.net[0].weight[:, -1] += 1.0
    assert not torch.allclose(net(x, t, t * 0.5), y)
