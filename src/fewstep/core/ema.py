r"""The one exponential-moving-average primitive, used by the trainer's EMA copies, the consistency / shortcut / IMM
target networks and the DMD family's fake-score merge:

.. math::
    \bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta,

computed as ``torch.lerp`` toward the source parameter (cast to the target's dtype); buffers are copied. A source
sharded by FSDP (DTensor parameters) is all-gathered for a plain target, so every rank must call it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["ema_update_"]


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, decay: float) -> None:
    r"""In place :math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` over matching parameters; buffers copied.

    Args:
        target: The averaged network :math:`\bar\theta` (updated in place).
        source: The trained network :math:`\theta`, with the same parameter names (e.g. a deep copy of it).
        decay: d in [0, 1]; 0 copies the source, 1 leaves the target unchanged.

    Raises:
        ValueError: if d lies outside [0, 1] or the two networks' parameter names differ.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1]; got {decay}")
    tp, sp = dict(target.named_parameters()), dict(source.named_parameters())
    if tp.keys() != sp.keys():
        raise ValueError("EMA update needs networks with identical parameter names")
    for k, p in tp.items():
        src = sp[k].detach()
        if isinstance(src, DTensor) and not isinstance(p, DTensor):  # an FSDP-sharded source: all-gather it
            src = src.full_tensor()
        p.lerp_(src.to(p.dtype), 1.0 - decay)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)
