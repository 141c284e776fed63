r"""DMD2's GAN head (Yin et al. 2024b, "Improved distribution matching distillation", sec. 4.3).

A classification branch :math:`D` reads the fake score's bottleneck features at a noisy input, so the fake score's
network doubles as the discriminator's encoder. With :math:`x_\tau = (1-\tau)x_0 + \tau\epsilon` (the linear path)
and :math:`\mathrm{softplus}(z) = \log(1 + e^z)`:

* discriminator (trained with the fake score, on detached student samples and real data):
  :math:`L_D = \mathbb{E}[\mathrm{softplus}(-D(x^{real}_\tau))] + \mathbb{E}[\mathrm{softplus}(D(x^{S}_\tau))]`,
  i.e. :math:`-\log\sigma(D)` on real and :math:`-\log(1-\sigma(D))` on student samples;
* generator (non-saturating): :math:`L_G = \mathbb{E}[\mathrm{softplus}(-D(x^{S}_\tau))]`, its gradient flowing into
  the student sample :math:`x^S_0` through the frozen fake network and head.

Features: the output of the last hidden activation (MLP), of the last middle block (U-Net, the lowest resolution)
or of the last transformer block (DiT), average-pooled to at most 4 x 4 cells (16 token groups) and flattened, so
the head keeps the spatial layout (a global mean lost it: on digits8 the discriminator stayed at chance). The
head is Linear-SiLU-Linear to one logit, of width the channel count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.methods._shared.dm import renoise

__all__ = ["bottleneck", "GANHead", "gan_logits", "discriminator_loss", "generator_loss"]


def bottleneck(net: nn.Module) -> nn.Module:
    """The submodule of a backbone whose output the GAN head reads.

    Args:
        net: The fake score's backbone (``FlowMap.net``): an MLP, U-Net or DiT of :mod:`fewstep.networks`.

    Returns:
        The last hidden activation (MLP), the last middle block (U-Net) or the last transformer block (DiT).

    Raises:
        ValueError: for any other backbone.
    """
    from fewstep.networks.dit import DiT
    from fewstep.networks.mlp import MLP
    from fewstep.networks.unet import UNet

    if isinstance(net, MLP):
        if len(net.net) < 2:
            raise ValueError("the GAN head needs an mlp with a hidden layer (student.depth >= 1)")
        return net.net[-2]
    if isinstance(net, UNet):
        return net.mid[-1]
    if isinstance(net, DiT):
        return net.blocks[-1]
    raise ValueError(f"the GAN head reads the bottleneck of an mlp, unet or dit backbone; got {type(net).__name__} "
                     "(set method.cfg.gan_weight=0)")


#: Spatial positions the head keeps: feature maps are average-pooled to at most GRID x GRID cells (tokens to at
#: most GRID**2 groups) and flattened, so the head sees where features are, with a size bounded in the resolution.
GRID = 4


def _pool(h: Tensor) -> Tensor:
    """(B, C) as is; (B, C, H, W) pooled to (B, C, <=GRID, <=GRID); (B, N, D) tokens to (B, <=GRID², D); flattened."""
    if h.dim() == 4:
        h = F.adaptive_avg_pool2d(h, (min(h.shape[2], GRID), min(h.shape[3], GRID)))
    elif h.dim() == 3:
        h = F.adaptive_avg_pool1d(h.transpose(1, 2), min(h.shape[1], GRID * GRID)).transpose(1, 2)
    return h.flatten(1)


def _bottleneck_output(fake: nn.Module, x: Tensor, tau: Tensor, cond: Tensor | None) -> Tensor:
    """The raw output of :func:`bottleneck` during one velocity evaluation of the fake score."""
    site, got = bottleneck(fake.net), []
    handle = site.register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        fake.velocity(x, tau, cond)
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"the GAN head's bottleneck {type(site).__name__} of {type(fake.net).__name__} did not run "
                         "in the fake score's forward pass")
    return got[-1]


def fake_features(fake: nn.Module, x: Tensor, tau: Tensor, cond: Tensor | None) -> Tensor:
    """Pooled, flattened bottleneck features of the fake score's velocity network at (x, τ, c), shape (B, F)."""
    return _pool(_bottleneck_output(fake, x, tau, cond))


class GANHead(nn.Module):
    """Linear-SiLU-Linear (hidden width = the bottleneck's channels) from the pooled features to one logit.

    Args:
        fake: The fake score (a velocity FlowMap); one dry forward at construction sizes the head.
    """

    def __init__(self, fake: nn.Module) -> None:
        super().__init__()
        p = next(fake.parameters())
        x = torch.zeros((1, *fake.net.event_shape), device=p.device, dtype=p.dtype)
        with torch.no_grad():
            raw = _bottleneck_output(fake, x, torch.full((1,), 0.5, device=p.device, dtype=p.dtype), None)
        width = raw.shape[1] if raw.dim() == 4 else raw.shape[-1]  # channels (maps) / features (tokens, MLP)
        f = _pool(raw).shape[-1]
        self.mlp = nn.Sequential(nn.Linear(f, width), nn.SiLU(), nn.Linear(width, 1)).to(p.device, p.dtype)

    def forward(self, features: Tensor) -> Tensor:
        """Logits of shape (B,)."""
        return self.mlp(features).squeeze(-1)


def gan_logits(fake: nn.Module, head: GANHead, x: Tensor, tau: Tensor, cond: Tensor | None) -> Tensor:
    """:math:`D(x, \\tau, c)`: the head on the fake score's features at the noisy input x, shape (B,)."""
    return head(fake_features(fake, x, tau, cond))


def discriminator_loss(fake: nn.Module, head: GANHead, x0_real: Tensor, x0_student: Tensor, tau_real: Tensor,
                       tau_student: Tensor, cond: Tensor | None) -> tuple[Tensor, dict[str, float]]:
    r"""Discriminator loss: batch means, :math:`\mathrm{softplus}(-D(x^{real}_\tau)) + \mathrm{softplus}(D(x^S_\tau))`.

    Args:
        fake: The fake score (its parameters and the head's receive the gradient).
        head: The GAN head.
        x0_real: Data samples, shape (B, ...).
        x0_student: Student samples (detached here), shape (B, ...).
        tau_real: Noise levels of the real samples, shape (B,).
        tau_student: Noise levels of the student samples, shape (B,).
        cond: Class labels of both sets (or None).

    Returns:
        The loss and logs (both terms and the accuracy of the sign of D on real and student samples).
    """
    d_real = gan_logits(fake, head, renoise(x0_real, tau_real, torch.randn_like(x0_real)), tau_real, cond)
    xs = x0_student.detach()
    d_fake = gan_logits(fake, head, renoise(xs, tau_student, torch.randn_like(xs)), tau_student, cond)
    real, fake_term = F.softplus(-d_real).mean(), F.softplus(d_fake).mean()
    acc = 0.5 * (float((d_real > 0).double().mean()) + float((d_fake < 0).double().mean()))
    return real + fake_term, {"gan_d_real": float(real.detach()), "gan_d_fake": float(fake_term.detach()),
                              "gan_d_acc": acc}


@contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` without gradient inside the block (the generator step does not train D)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def generator_loss(fake: nn.Module, head: GANHead, x0_student: Tensor, tau: Tensor,
                   cond: Tensor | None) -> Tensor:
    r"""Non-saturating :math:`L_G = \mathrm{mean}\,\mathrm{softplus}(-D(x^S_\tau))`, gradient into ``x0_student`` only.

    Args:
        fake: The fake score (frozen here).
        head: The GAN head (frozen here).
        x0_student: Student samples with their graph, shape (B, ...).
        tau: Noise levels, shape (B,).
        cond: Class labels (or None).

    Returns:
        The scalar loss.
    """
    with _frozen(fake, head):
        x = renoise(x0_student, tau, torch.randn_like(x0_student))
        return F.softplus(-gan_logits(fake, head, x, tau, cond)).mean()
