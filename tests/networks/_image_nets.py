"""Shared checks of the image backbones (U-Net, DiT): shapes, identity, conditioning, JVP, torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fewstep.core.flowmap import PARAMETERIZATIONS, FlowMap


def randomize(net: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Add N(0, std^2) noise to every parameter so zero-initialised layers do not hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def check_shapes_and_identity(make: Callable[..., nn.Module], shape: tuple[int, ...]) -> None:
    """Output shape = input shape for every conditioning; f_{t->t} = id for every parameterization."""
    for param in PARAMETERIZATIONS:
        net = randomize(make(num_classes=3, use_s=param == "average_velocity"))
        fm = FlowMap(net, param)
        x = torch.randn(4, *shape)
        t = torch.tensor([0.9, 0.5, 0.1, 1.0])
        for cond in (None, torch.tensor([0, 1, 2, -1])):
            out = net(x, t, torch.rand(4), cond)
            assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
            assert torch.equal(fm(x, t, t, cond), x)
            assert not torch.allclose(fm(x, t, torch.zeros(4), cond), x)


@torch.no_grad()
def check_conditioning(make: Callable[..., nn.Module], shape: tuple[int, ...]) -> None:
    """cond=None equals the null label; rows are independent; labels change the output; s only with use_s."""
    net = randomize(make(num_classes=3, use_s=True)).eval()
    x, t, s = torch.randn(4, *shape), torch.rand(4), torch.rand(4)
    null = net(x, t, s, torch.full((4,), -1))
    assert torch.equal(net(x, t, s, None), null)
    lab = net(x, t, s, torch.tensor([0, 1, 2, 0]))
    assert float((lab - null).abs().flatten(1).max(1).values.min()) > 1e-4
    mixed = net(x, t, s, torch.tensor([0, -1, 2, -1]))
    assert torch.allclose(mixed[[1, 3]], null[[1, 3]], atol=1e-6) and torch.allclose(mixed[[0, 2]], lab[[0, 2]],
                                                                                        atol=1e-6)
    assert float((net(x, t, s * 0.5, None) - null).abs().max()) > 1e-4  # sees s through t - s
    plain = randomize(make(num_classes=None, use_s=False)).eval()
    assert torch.equal(plain(x, t, s), plain(x, t, torch.zeros(4)))  # use_s=False ignores s
    try:
        plain(x, t, s, torch.tensor([0, 1, 2, 0]))
    except ValueError as e:
        assert "num_classes" in str(e)
    else:
        raise AssertionError("labels on an unconditional network must raise")


def check_jvp_matches_fd(make: Callable[..., nn.Module], shape: tuple[int, ...]) -> None:
    r"""torch.func.jvp along (v, 1, 0) and a random (x, t, s) tangent equals central differences (float64)."""
    torch.manual_seed(0)
    net = randomize(make(num_classes=3, use_s=True)).double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    t = torch.tensor([0.8, 0.5, 0.3], dtype=torch.float64)
    s = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)
    cond = torch.tensor([1, -1, 2])
    fn = lambda a, b, c: net(a, b, c, cond)  # noqa: E731
    tangents = [(torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s)),
                (torch.randn_like(x), torch.randn_like(t), torch.randn_like(s))]
    for tan in tangents:
        _, dF = torch.func.jvp(fn, (x, t, s), tan)
        eps = 1e-6
        plus = fn(*(p + eps * v for p, v in zip((x, t, s), tan, strict=True)))
        minus = fn(*(p - eps * v for p, v in zip((x, t, s), tan, strict=True)))
        fd = (plus - minus) / (2 * eps)
        assert float(dF.detach().abs().max()) > 1e-3
        assert torch.allclose(dF.detach(), fd.detach(), rtol=1e-5, atol=1e-6)


def check_compile_graph(make: Callable[..., nn.Module], shape: tuple[int, ...], backend: str) -> None:
    """torch.compile(fullgraph=True) with ``backend`` reproduces the eager output (no graph breaks)."""
    torch.manual_seed(0)
    net = randomize(make(num_classes=3, use_s=True)).eval()
    x, t, s, c = torch.randn(2, *shape), torch.rand(2), torch.rand(2), torch.tensor([1, -1])
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, s, c), net(x, t, s, c), rtol=1e-4, atol=1e-5)
