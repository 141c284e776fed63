r"""A small ADM/EDM-style U-Net backbone F(x, t, s[, cond]) for images of shape (C, H, W).

Layout (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", the ADM U-Net; Karras et al. 2022, EDM):
a 3x3 input convolution, ``len(channel_mult)`` resolution levels of ``num_res_blocks`` residual blocks each
(stride-2 convolution between levels), a middle block (residual, self-attention, residual), the mirrored
up-path with skip connections (nearest upsampling + 3x3 convolution) and GroupNorm-SiLU-conv output, whose
weights start at zero (so F = 0 at initialisation). Self-attention runs at the lowest resolution.

Every residual block adds the projected conditioning vector
:math:`e = \mathrm{MLP}_t(\phi(t)) + \mathrm{MLP}_h(\phi(t-s)) + E[c]`
(:class:`~fewstep.networks._blocks.ConditionEmbedding`) to its hidden activations:
:math:`h \leftarrow x + \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(\mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x))) + W e)))`.
The null label -1 selects the extra row of E (classifier-free guidance). The call signature and attributes
(``event_shape``, ``num_classes``, ``use_s``) are those of :class:`fewstep.networks.mlp.MLP`, so a
:class:`~fewstep.core.flowmap.FlowMap` wraps it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewstep.networks._blocks import ConditionEmbedding, attention, check_image_input, group_norm

__all__ = ["UNet", "ResBlock", "AttentionBlock"]


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    r"""Residual block :math:`x' = \mathrm{skip}(x) + \mathrm{conv}_2(\mathrm{drop}(\mathrm{SiLU}(\mathrm{GN}(
    \mathrm{conv}_1(\mathrm{SiLU}(\mathrm{GN}(x))) + W e))))` with the second convolution zero-initialised."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, out_ch)
        self.norm2, self.drop = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x))) + self.emb(e)[:, :, None, None]
        h = self.conv2(self.drop(self.act(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    r"""Self-attention over the H*W positions, :math:`x + \mathrm{proj}(\mathrm{softmax}(QK^\top/\sqrt d)V)`,
    with Q, K, V from a 1x1 convolution of GN(x) and a zero-initialised output projection."""

    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} are not divisible by heads={heads}")
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # (b, heads, hw, d)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class UNet(nn.Module):
    """U-Net backbone F(x, t, s[, cond]) for images (see the module docstring).

    Args:
        event_shape: (C, H, W); H and W divisible by 2 ** (len(channel_mult) - 1).
        channels: Channels of the first level.
        channel_mult: Channel multiplier per level (one level per entry).
        num_res_blocks: Residual blocks per level on the down path (one more on the up path).
        emb_dim: Size of each sinusoidal time embedding.
        num_classes: Number of classes (an extra null class handles cond = -1); None = unconditional.
        use_s: Whether the network sees s through h = t - s (flow maps) or not (velocity / consistency).
        heads: Attention heads.
        dropout: Dropout inside the residual blocks.
        max_freq: Largest frequency of the sinusoidal time embeddings.
        min_freq: Smallest frequency of the sinusoidal time embeddings.
        raw_time: Also feed the raw scalars t and t - s to the embedding MLPs.
        attn_levels: Levels with self-attention after each residual block (default: none; the middle block at
            the lowest resolution always has one).

    Raises:
        ValueError: for an event shape that is not (C, H, W) or not divisible by the downsampling factor.
    """

    def __init__(self, event_shape: Sequence[int], channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, emb_dim: int = 64, num_classes: int | None = None, use_s: bool = True,
                 heads: int = 1, dropout: float = 0.0, max_freq: float = 32.0, min_freq: float = 1.0,
                 raw_time: bool = False, attn_levels: Sequence[int] = ()) -> None:
        super().__init__()
        self.event_shape = tuple(int(v) for v in event_shape)
        if len(self.event_shape) != 3:
            raise ValueError(f"UNet needs event_shape (C, H, W); got {self.event_shape}")
        factor = 2 ** (len(channel_mult) - 1)
        if not channel_mult or self.event_shape[1] % factor or self.event_shape[2] % factor:
            raise ValueError(f"UNet with channel_mult={tuple(channel_mult)} needs H and W divisible by {factor}; "
                             f"got event_shape {self.event_shape}")
        if channels < 1 or num_res_blocks < 1:
            raise ValueError(f"need channels >= 1 and num_res_blocks >= 1; got {channels}, {num_res_blocks}")
        self.num_classes, self.use_s = num_classes, use_s
        in_ch, emb_ch = self.event_shape[0], 4 * channels
        self.cond = ConditionEmbedding(emb_ch, emb_dim, num_classes, use_s, max_freq, min_freq, raw_time)
        self.conv_in = nn.Conv2d(in_ch, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._level_block(ch, channels * mult, emb_ch, dropout, lvl in attn_levels, heads))
                ch = channels * mult
                skips.append(ch)
            if lvl < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_ch, dropout), AttentionBlock(ch, heads),
                                  ResBlock(ch, ch, emb_ch, dropout)])
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._level_block(ch + skips.pop(), channels * mult, emb_ch, dropout,
                                                 lvl in attn_levels, heads))
                ch = channels * mult
            if lvl > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_ch, 3, padding=1)))

    @staticmethod
    def _level_block(in_ch: int, out_ch: int, emb_ch: int, dropout: float, attn: bool, heads: int) -> nn.Module:
        res = ResBlock(in_ch, out_ch, emb_ch, dropout)
        return nn.ModuleList([res, AttentionBlock(out_ch, heads)]) if attn else res

    @staticmethod
    def _run_block(block: nn.Module, h: Tensor, e: Tensor) -> Tensor:
        if isinstance(block, ResBlock):
            return block(h, e)
        if isinstance(block, nn.ModuleList):  # residual block + attention
            return block[1](block[0](h, e))
        return block(h)  # down/up-sampling

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Evaluate F(x, t, s, cond) for x of shape (batch, C, H, W); returns a tensor of x's shape."""
        check_image_input(x, self.event_shape, "UNet")
        e = self.cond(t, s, cond, x.dtype)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run_block(block, h, e)
            hs.append(h)
        for block in self.mid:
            h = block(h, e) if isinstance(block, ResBlock) else block(h)
        for block in self.up:
            if isinstance(block, nn.Sequential):
                h = block(h)
            else:
                h = self._run_block(block, torch.cat([h, hs.pop()], dim=1), e)
        return self.out(h)
