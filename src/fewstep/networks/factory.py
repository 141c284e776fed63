"""Build a backbone F(x, t, s[, cond]) by kind: ``mlp`` (vectors, any shape flattened), ``unet`` or ``dit`` (images).

The shared options mean the same for every kind: ``hidden`` is the width (MLP hidden units, U-Net channels of
the first level, DiT token width), ``depth`` the depth (MLP hidden layers, U-Net residual blocks per level,
DiT blocks); ``emb_dim``/``max_freq``/``min_freq``/``raw_time`` shape the time embeddings. Kind-specific
options go in ``options`` (config key ``student.options``):

* ``unet``: ``channel_mult`` (list, default [1, 2]), ``heads`` (1), ``dropout`` (0), ``attn_levels`` ([]).
* ``dit``: ``patch_size`` (2), ``heads`` (4), ``mlp_ratio`` (4).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from fewstep.networks.dit import DiT
from fewstep.networks.mlp import MLP
from fewstep.networks.unet import UNet

__all__ = ["NETWORK_KINDS", "build_network"]

NETWORK_KINDS: dict[str, str] = {
    "mlp": "MLP on flattened inputs with sinusoidal t, t-s and class embeddings",
    "unet": "ADM-style U-Net for (C, H, W) images: residual blocks, GroupNorm, attention at the lowest resolution",
    "dit": "diffusion transformer for (C, H, W) images: patches, adaLN-Zero on t, t-s and class",
}

_OPTIONS = {"mlp": (), "unet": ("channel_mult", "heads", "dropout", "attn_levels"),
            "dit": ("patch_size", "heads", "mlp_ratio")}


def build_network(kind: str, event_shape: tuple[int, ...], num_classes: int | None = None, use_s: bool = True,
                  hidden: int = 256, depth: int = 4, emb_dim: int = 64, activation: str = "silu",
                  max_freq: float = 32.0, min_freq: float = 1.0, raw_time: bool = False,
                  options: dict[str, Any] | None = None) -> nn.Module:
    """The backbone of ``kind`` for samples of ``event_shape`` (see the module docstring).

    Args:
        kind: ``mlp``, ``unet`` or ``dit`` (see :data:`NETWORK_KINDS`).
        event_shape: Shape of one sample; (C, H, W) for the image backbones.
        num_classes: Number of classes for conditional models (an extra null class handles cond=-1), or None.
        use_s: Whether the network sees s (flow maps) or not (velocity networks, consistency models).
        hidden: Width: MLP hidden units, U-Net channels of the first level, DiT token width.
        depth: Depth: MLP hidden layers, U-Net residual blocks per level, DiT blocks.
        emb_dim: Size of each time embedding.
        activation: MLP activation (``silu`` or ``gelu``); the image backbones take ``silu`` only.
        max_freq: Largest frequency of the sinusoidal time embeddings.
        min_freq: Smallest frequency of the sinusoidal time embeddings.
        raw_time: Also feed the raw scalars t and t - s.
        options: Kind-specific options (see the module docstring).

    Returns:
        The backbone module F(x, t, s[, cond]).

    Raises:
        ValueError: for an unknown kind, an unknown option, an image backbone on non-image data, or an
            activation other than ``silu`` for the image backbones (their activations are fixed).
    """
    if kind not in NETWORK_KINDS:
        raise ValueError(f"unknown student.kind {kind!r}; expected one of {sorted(NETWORK_KINDS)}")
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown student.options {unknown} for kind {kind!r}; valid: {sorted(_OPTIONS[kind])}")
    common = dict(num_classes=num_classes, use_s=use_s, emb_dim=emb_dim, max_freq=max_freq, min_freq=min_freq,
                  raw_time=raw_time)
    if kind == "mlp":
        return MLP(math.prod(event_shape), hidden=hidden, depth=depth, event_shape=tuple(event_shape),
                   activation=activation, **common)
    if len(event_shape) != 3:
        raise ValueError(f"student.kind={kind!r} needs image data of shape (C, H, W); the data has event shape "
                         f"{tuple(event_shape)} (for 8x8 digits use data.kwargs.image=true)")
    if activation != "silu":
        raise ValueError(f"student.activation applies to kind 'mlp' only; got {activation!r} for kind {kind!r}")
    for key in ("channel_mult", "attn_levels"):
        if key in opts:
            opts[key] = tuple(int(v) for v in opts[key])
    if kind == "unet":
        return UNet(event_shape, channels=hidden, num_res_blocks=depth, **common, **opts)
    return DiT(event_shape, hidden=hidden, depth=depth, **common, **opts)

