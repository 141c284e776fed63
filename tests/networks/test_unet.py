"""Tests of the U-Net backbone: shapes, f_{t->t} = id, conditioning, JVP vs finite differences, torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch
from _image_nets import check_compile_graph, check_conditioning, check_jvp_matches_fd, check_shapes_and_identity

from fewstep.core.jvp import jvp
from fewstep.networks.factory import build_network
from fewstep.networks.unet import UNet

torch.set_num_threads(1)

CASES = [((1, 8, 8), (1, 2)), ((3, 16, 16), (1, 2, 2))]


def _make(shape: tuple[int, ...], mult: tuple[int, ...], **kw) -> UNet:
    return UNet(shape, channels=8, channel_mult=mult, num_res_blocks=1, emb_dim=8, heads=2, attn_levels=(1,), **kw)


@pytest.mark.parametrize("shape,mult", CASES)
def test_unet_shapes_and_identity(shape: tuple[int, ...], mult: tuple[int, ...]) -> None:
    check_shapes_and_identity(functools.partial(_make, shape, mult), shape)


def test_unet_conditioning() -> None:
    check_conditioning(functools.partial(_make, (1, 8, 8), (1, 2)), (1, 8, 8))


def test_unet_output_starts_at_zero_and_layout() -> None:
    net = UNet((1, 8, 8), channels=8, channel_mult=(1, 2), emb_dim=8, num_classes=10)
    out = net(torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2), torch.tensor([3, -1]))
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output convolution
    assert net.cond.c_emb.num_embeddings == 11 and net.event_shape == (1, 8, 8) and net.use_s
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) >= 8


@pytest.mark.parametrize("shape,mult", CASES)
def test_unet_jvp_equals_finite_difference(shape: tuple[int, ...], mult: tuple[int, ...]) -> None:
    check_jvp_matches_fd(functools.partial(_make, shape, mult), shape)


def test_unet_jvp_modes_agree() -> None:
    """core.jvp's func and autograd (double backward) modes agree on the U-Net, attention included."""
    from _image_nets import randomize

    net = randomize(_make((1, 8, 8), (1, 2), num_classes=3)).double()
    x, t, s = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0.7, 0.4]).double(), torch.zeros(2).double()
    tan = (torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s))
    fn = lambda a, b, c: net(a, b, c, torch.tensor([0, -1]))  # noqa: E731
    _, d_func = jvp(fn, (x, t, s), tan, mode="func")
    _, d_auto = jvp(fn, (x, t, s), tan, mode="autograd")
    assert torch.allclose(d_func, d_auto, rtol=1e-8, atol=1e-10)


def test_unet_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet((1, 6, 6), channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        UNet((64,))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        UNet((1, 8, 8), channels=8)(torch.randn(2, 64), torch.rand(2), torch.rand(2))


def test_factory_builds_unet_and_rejects_bad_options() -> None:
    net = build_network("unet", (1, 8, 8), num_classes=10, use_s=False, hidden=8, depth=2,
                        options={"channel_mult": [1, 2], "heads": 2})
    assert isinstance(net, UNet) and not net.use_s and net.num_classes == 10
    with pytest.raises(ValueError, match="unknown student.options"):
        build_network("unet", (1, 8, 8), options={"patch_size": 2})
    with pytest.raises(ValueError, match="image data"):
        build_network("unet", (64,))
    with pytest.raises(ValueError, match="unknown student.kind"):
        build_network("resnet", (1, 8, 8))


def test_unet_compiles_without_graph_breaks() -> None:
    """Dynamo captures the whole forward (fullgraph) and reproduces the eager output; no C compiler needed."""
    check_compile_graph(functools.partial(_make, (1, 8, 8), (1, 2)), (1, 8, 8), backend="eager")


@pytest.mark.slow
def test_unet_compiles_with_inductor() -> None:
    """Inductor (the default backend) output equals eager (> 20 s on a loaded 2-core CPU, hence slow)."""
    check_compile_graph(functools.partial(_make, (1, 8, 8), (1, 2)), (1, 8, 8), backend="inductor")
