r"""Backbones F_theta(x, t, s[, cond]) for vector and small-image data.

Every backbone in fewstep has the signature ``net(x, t, s, cond=None)`` with x of shape (batch, ...),
t and s of shape (batch,) and cond an optional LongTensor of class labels of shape (batch,), where the
label ``-1`` means "no class" (the null token used by classifier-free guidance). A velocity network is the
same module called with s = t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalEmbedding", "MLP"]


class SinusoidalEmbedding(nn.Module):
    r"""Sinusoidal embedding of a scalar in [0, 1]: :math:`[\sin(2\pi f_k t), \cos(2\pi f_k t)]_k`.

    Frequencies are log-spaced between ``min_freq`` and ``max_freq``. Small frequencies (not the x1000 scale of
    diffusion codes) keep d/dt of the embedding O(max_freq), which keeps the (t-s)·dF/dt targets of JVP methods
    bounded. With ``min_freq`` = 1 the lowest feature has period 1, so it cannot tell t = 0 from t = 1; a
    ``min_freq`` below 0.5 removes that aliasing on [0, 1].

    Args:
        dim: Output dimension (even).
        max_freq: Largest frequency.
        min_freq: Smallest frequency.
    """

    def __init__(self, dim: int = 64, max_freq: float = 32.0, min_freq: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"need 0 < min_freq <= max_freq; got min_freq={min_freq}, max_freq={max_freq}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = 2 * math.pi * t[:, None].to(self.freqs.dtype) * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class MLP(nn.Module):
    """MLP backbone F(x, t, s[, cond]) with sinusoidal embeddings of t and h = t - s and a class embedding.

    Args:
        dim: Number of data dimensions (images are flattened; ``event_shape`` restores the shape).
        hidden: Width of the hidden layers.
        depth: Number of hidden layers.
        emb_dim: Size of each time embedding.
        num_classes: Number of classes for conditional models (an extra null class handles cond=-1).
        use_s: Whether the network sees s (flow maps) or not (velocity networks, consistency models).
        event_shape: Shape of one sample, default (dim,).
        activation: "silu" or "gelu".
        max_freq: Largest frequency of the sinusoidal time embeddings (JVP students: 2-8).
        min_freq: Smallest frequency of the sinusoidal time embeddings.
        raw_time: Also feed the raw scalars t and h = t - s (a smooth, non-periodic input that JVP targets
            differentiate without amplification).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        num_classes: int | None = None,
        use_s: bool = True,
        event_shape: tuple[int, ...] | None = None,
        activation: str = "silu",
        max_freq: float = 32.0,
        min_freq: float = 1.0,
        raw_time: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.use_s, self.num_classes, self.raw_time = dim, use_s, num_classes, raw_time
        self.event_shape = tuple(event_shape) if event_shape is not None else (dim,)
        if math.prod(self.event_shape) != dim:
            raise ValueError(f"event_shape {self.event_shape} does not have {dim} elements")
        acts = {"silu": nn.SiLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(acts)}")
        self.t_emb = SinusoidalEmbedding(emb_dim, max_freq, min_freq)
        self.h_emb = SinusoidalEmbedding(emb_dim, max_freq, min_freq) if use_s else None
        self.c_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        in_dim = dim + emb_dim * (1 + int(use_s) + int(bool(num_classes))) + raw_time * (1 + int(use_s))
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), acts[activation]()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def h_columns(self) -> list[int]:
        """Input columns of the first linear layer ``net.0`` fed by h = t - s (its embedding, then the raw h when
        ``raw_time``); empty without ``use_s``. Dropping them gives the layout of the same MLP built without s.

        Returns:
            Column indices into ``net[0].weight``.
        """
        if self.h_emb is None:
            return []
        e = 2 * len(self.t_emb.freqs)
        start = self.dim + e  # after x and phi(t)
        return [*range(start, start + e), *([start + e + 1] if self.raw_time else [])]  # raw t sits at start + e

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Evaluate F(x, t, s, cond); returns a tensor of x's shape."""
        b = x.shape[0]
        feats = [x.reshape(b, -1), self.t_emb(t)]
        h = t - (t if s is None else s)
        if self.h_emb is not None:
            feats.append(self.h_emb(h))
        if self.raw_time:
            feats.append(t[:, None])
            if self.h_emb is not None:
                feats.append(h[:, None])
        if self.c_emb is not None:
            if cond is None:
                cond = torch.full((b,), -1, dtype=torch.long, device=x.device)
            idx = torch.where(cond < 0, torch.full_like(cond, self.num_classes), cond)
            feats.append(self.c_emb(idx))
        elif cond is not None and bool((cond >= 0).any()):
            raise ValueError("this network was built without num_classes but received class labels")
        out = self.net(torch.cat([f.to(x.dtype) for f in feats], dim=-1))
        return out.reshape(x.shape)
