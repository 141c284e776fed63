r"""A small diffusion transformer (DiT, Peebles & Xie 2023) backbone F(x, t, s[, cond]) for (C, H, W) images.

The image is cut into p x p patches (a stride-p convolution), a fixed 2-D sine-cosine position embedding is
added, and ``depth`` transformer blocks with adaLN-Zero conditioning follow. The conditioning vector is
:math:`e = \mathrm{MLP}_t(\phi(t)) + \mathrm{MLP}_h(\phi(t-s)) + E[c]`
(:class:`~fewstep.networks._blocks.ConditionEmbedding`; label -1 = the null class of classifier-free guidance).
Each block computes, with :math:`(\beta_1,\gamma_1,\alpha_1,\beta_2,\gamma_2,\alpha_2) = W\,\mathrm{SiLU}(e)`
(W zero-initialised, so every block starts as the identity):

.. math::
    z \leftarrow z + \alpha_1\,\mathrm{Attn}(\mathrm{LN}(z)(1+\gamma_1)+\beta_1),\qquad
    z \leftarrow z + \alpha_2\,\mathrm{MLP}(\mathrm{LN}(z)(1+\gamma_2)+\beta_2).

A final adaLN layer and a zero-initialised linear map return p*p*C values per token, reassembled into the
image (F = 0 at initialisation). Attributes ``event_shape``, ``num_classes`` and ``use_s`` match
:class:`fewstep.networks.mlp.MLP`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewstep.networks._blocks import ConditionEmbedding, attention, check_image_input

__all__ = ["DiT", "DiTBlock", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    r"""Fixed 2-D position embedding (h*w, dim): half the channels encode the row, half the column, each as
    :math:`[\sin(p\,\omega_k), \cos(p\,\omega_k)]` with :math:`\omega_k = 10000^{-k/(dim/4)}`."""
    if dim % 4:
        raise ValueError(f"DiT hidden size must be divisible by 4 for the 2-D position embedding; got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def enc(p: Tensor) -> Tensor:
        a = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).to(torch.float32)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (see the module docstring)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"DiT hidden size {hidden} is not divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mid = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mid), nn.GELU(approximate="tanh"), nn.Linear(mid, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, z: Tensor, e: Tensor) -> Tensor:
        b, n, d = z.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(e).chunk(6, dim=1)
        q, k, v = self.qkv(_modulate(self.norm1(z), sh1, sc1)).reshape(b, n, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        a = attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        z = z + g1[:, None] * self.proj(a)
        return z + g2[:, None] * self.mlp(_modulate(self.norm2(z), sh2, sc2))


class DiT(nn.Module):
    """Diffusion transformer F(x, t, s[, cond]) (see the module docstring).

    Args:
        event_shape: (C, H, W) with H and W divisible by ``patch_size``.
        patch_size: Side p of the square patches (tokens = H*W / p^2).
        hidden: Token width (divisible by 4 and by ``heads``).
        depth: Number of transformer blocks.
        heads: Attention heads.
        mlp_ratio: Width of each block's MLP relative to ``hidden``.
        emb_dim: Size of each sinusoidal time embedding.
        num_classes: Number of classes (an extra null class handles cond = -1); None = unconditional.
        use_s: Whether the network sees s through h = t - s (flow maps) or not.
        max_freq: Largest frequency of the sinusoidal time embeddings.
        min_freq: Smallest frequency of the sinusoidal time embeddings.
        raw_time: Also feed the raw scalars t and t - s to the embedding MLPs.

    Raises:
        ValueError: for an event shape that is not (C, H, W) or not divisible by the patch size.
    """

    def __init__(self, event_shape: Sequence[int], patch_size: int = 2, hidden: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, emb_dim: int = 64, num_classes: int | None = None,
                 use_s: bool = True, max_freq: float = 32.0, min_freq: float = 1.0, raw_time: bool = False) -> None:
        super().__init__()
        self.event_shape = tuple(int(v) for v in event_shape)
        if len(self.event_shape) != 3:
            raise ValueError(f"DiT needs event_shape (C, H, W); got {self.event_shape}")
        c, h, w = self.event_shape
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"DiT patch_size={patch_size} must divide H and W; got event_shape {self.event_shape}")
        if depth < 1:
            raise ValueError(f"DiT depth must be >= 1, got {depth}")
        self.num_classes, self.use_s, self.patch_size = num_classes, use_s, patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.patch = nn.Conv2d(c, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_pos_embed_2d(hidden, *self.grid)[None], persistent=False)
        self.cond = ConditionEmbedding(hidden, emb_dim, num_classes, use_s, max_freq, min_freq, raw_time)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.head = nn.Linear(hidden, patch_size * patch_size * c)
        for lin in (self.ada[1], self.head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(hidden, -1))
        for blk in self.blocks:
            for lin in (blk.qkv, blk.proj, blk.mlp[0], blk.mlp[2]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Evaluate F(x, t, s, cond) for x of shape (batch, C, H, W); returns a tensor of x's shape."""
        check_image_input(x, self.event_shape, "DiT")
        b = x.shape[0]
        e = self.cond(t, s, cond, x.dtype)
        z = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        for blk in self.blocks:
            z = blk(z, e)
        shift, scale = self.ada(e).chunk(2, dim=1)
        out = self.head(_modulate(self.norm(z), shift, scale))  # (b, tokens, p*p*C)
        p, (gh, gw), c = self.patch_size, self.grid, self.event_shape[0]
        out = out.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, gh * p, gw * p)
