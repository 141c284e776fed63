r"""Building blocks shared by the image backbones (:mod:`fewstep.networks.unet`, :mod:`fewstep.networks.dit`).

Plain torch on purpose: every block must run under ``torch.func.jvp`` (forward-mode AD), the double-backward
JVP of :mod:`fewstep.core.jvp`, ``torch.compile`` and the default install (no diffusers/timm). Attention is
therefore written out as :math:`\mathrm{softmax}(QK^\top/\sqrt{d})V`: fused SDPA kernels have no forward-mode
rule, and at the token counts used here (16-64) they would not be faster on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewstep.networks.mlp import SinusoidalEmbedding

__all__ = ["ConditionEmbedding", "attention", "group_norm", "check_image_input"]


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels`` (>= 4 channels/group
    when possible)."""
    g = max(1, min(max_groups, channels // 4))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    r"""Multi-head attention :math:`\mathrm{softmax}(QK^\top/\sqrt{d})V` on (batch, heads, tokens, d) tensors,
    written out so that forward-mode AD, double backward and torch.compile all apply."""
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(dim=-1), v)


def check_image_input(x: Tensor, event_shape: tuple[int, ...], name: str) -> None:
    """Raise a one-line ValueError when ``x`` is not a batch of ``event_shape`` images."""
    if tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name} expects inputs of shape (batch, {', '.join(map(str, event_shape))}); "
                         f"got {tuple(x.shape)}")


class ConditionEmbedding(nn.Module):
    r"""The conditioning vector :math:`e = \mathrm{MLP}_t(\phi(t)) + \mathrm{MLP}_h(\phi(t-s)) + E[c]`.

    :math:`\phi` is the sinusoidal embedding of :class:`~fewstep.networks.mlp.SinusoidalEmbedding` (plus the raw
    scalar when ``raw_time``); each time gets its own two-layer MLP; E has one extra row for the null label -1
    (classifier-free guidance).

    Args:
        out_dim: Size of the conditioning vector.
        emb_dim: Size of each sinusoidal embedding.
        num_classes: Number of classes (None: unconditional).
        use_s: Embed h = t - s as well (flow maps); False for velocity / consistency backbones.
        max_freq: Largest sinusoidal frequency.
        min_freq: Smallest sinusoidal frequency.
        raw_time: Append the raw scalar t (and h) to the sinusoidal features.
    """

    def __init__(self, out_dim: int, emb_dim: int = 64, num_classes: int | None = None, use_s: bool = True,
                 max_freq: float = 32.0, min_freq: float = 1.0, raw_time: bool = False) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes}")
        self.num_classes, self.use_s, self.raw_time = num_classes, use_s, raw_time
        self.t_emb = SinusoidalEmbedding(emb_dim, max_freq, min_freq)
        in_dim = emb_dim + int(raw_time)
        self.t_mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.h_mlp = (nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
                      if use_s else None)
        self.c_emb = nn.Embedding(num_classes + 1, out_dim) if num_classes else None

    def _feats(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        f = self.t_emb(t)
        if self.raw_time:
            f = torch.cat([f, t[:, None].to(f.dtype)], dim=-1)
        return f.to(dtype)

    def forward(self, t: Tensor, s: Tensor | None, cond: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Conditioning vector of shape (batch, out_dim); ``cond`` -1 (or None) selects the null class."""
        e = self.t_mlp(self._feats(t, dtype))
        if self.h_mlp is not None:
            e = e + self.h_mlp(self._feats(t - (t if s is None else s), dtype))
        if self.c_emb is not None:
            if cond is None:
                cond = torch.full(t.shape, -1, dtype=torch.long, device=t.device)
            idx = torch.where(cond < 0, torch.full_like(cond, self.num_classes), cond)
            e = e + self.c_emb(idx)
        elif cond is not None and bool((cond >= 0).any()):
            raise ValueError("this network was built without num_classes but received class labels")
        return e
