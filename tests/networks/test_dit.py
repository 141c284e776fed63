"""Tests of the DiT backbone: shapes, f_{t->t} = id, conditioning, patch layout, JVP, torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch
from _image_nets import (
    check_compile_graph,
    check_conditioning,
    check_jvp_matches_fd,
    check_shapes_and_identity,
    randomize,
)

from fewstep.networks.dit import DiT, sincos_pos_embed_2d
from fewstep.networks.factory import build_network

torch.set_num_threads(1)

SHAPES = [(1, 8, 8), (3, 16, 16)]


def _make(shape: tuple[int, ...], **kw) -> DiT:
    return DiT(shape, patch_size=4 if shape[1] == 16 else 2, hidden=16, depth=2, heads=2, mlp_ratio=2.0,
               emb_dim=8, **kw)


@pytest.mark.parametrize("shape", SHAPES)
def test_dit_shapes_and_identity(shape: tuple[int, ...]) -> None:
    check_shapes_and_identity(functools.partial(_make, shape), shape)


def test_dit_conditioning() -> None:
    check_conditioning(functools.partial(_make, (1, 8, 8)), (1, 8, 8))


def test_dit_starts_at_zero_and_patches_are_local() -> None:
    net = _make((1, 8, 8), num_classes=10)
    out = net(torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2), torch.tensor([3, -1]))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero head
    # with depth-0 mixing removed (gates zero) but a random head, output patch (i, j) depends only on input patch
    # (i, j): perturbing one input pixel changes exactly its own 2x2 output patch
    with torch.no_grad():
        net.head.weight.normal_(0, 0.3)
        net.ada[1].bias.normal_(0, 0.3)
    x = torch.randn(1, 1, 8, 8)
    t = torch.tensor([0.5])
    x2 = x.clone()
    x2[0, 0, 5, 2] += 1.0
    diff = (net(x2, t, t) - net(x, t, t)).abs()[0, 0] > 1e-7
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[4:6, 2:4] = True
    assert torch.equal(diff, want)


def test_sincos_position_embedding() -> None:
    pe = sincos_pos_embed_2d(8, 2, 3)
    assert pe.shape == (6, 8)
    assert torch.allclose(pe[:, 0], torch.tensor([0.0, 0, 0, 1, 1, 1]).sin())  # row part, frequency 1
    assert torch.allclose(pe[:, 4], torch.tensor([0.0, 1, 2, 0, 1, 2]).sin())  # column part, frequency 1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_dit_jvp_equals_finite_difference(shape: tuple[int, ...]) -> None:
    check_jvp_matches_fd(functools.partial(_make, shape), shape)


def test_dit_jvp_under_torch_func_with_grad() -> None:
    """The JVP methods' pattern: a forward pass with grad plus a no-grad torch.func.jvp on the same weights."""
    net = randomize(_make((1, 8, 8), num_classes=3))
    x, t, s = torch.randn(4, 1, 8, 8), torch.rand(4), torch.rand(4) * 0.5
    with torch.no_grad():
        _, dF = torch.func.jvp(lambda a, b, c: net(a, b, c, None), (x, t, s),
                               (torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s)))
    loss = (net(x, t, s) - dF).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_dit_bad_shapes_and_factory() -> None:
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        DiT((1, 8, 8), patch_size=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        DiT((1, 8, 8), hidden=20, heads=3)
    net = build_network("dit", (1, 8, 8), num_classes=10, hidden=16, depth=1, options={"patch_size": 4, "heads": 2})
    assert isinstance(net, DiT) and net.grid == (2, 2)
    with pytest.raises(ValueError, match="kind 'mlp' only"):
        build_network("dit", (1, 8, 8), activation="gelu")


def test_dit_compiles_without_graph_breaks() -> None:
    check_compile_graph(functools.partial(_make, (1, 8, 8)), (1, 8, 8), backend="eager")


@pytest.mark.slow
def test_dit_compiles_with_inductor() -> None:
    check_compile_graph(functools.partial(_make, (1, 8, 8)), (1, 8, 8), backend="inductor")
