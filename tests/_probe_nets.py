"""Probe networks for loss-equation tests: outputs and derivatives are explicit formulas, computed by hand."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearProbe(nn.Module):
    """F(x, t, s, c) = a x + b t + d s + e * label (label -1 = the null label; ``cond=None`` counts as 0).

    Learnable float64 scalars a, b, d, e start at 0.3, -0.7, 0.4, 0.5.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d, self.e = (nn.Parameter(torch.tensor(v, dtype=torch.float64))
                                          for v in (0.3, -0.7, 0.4, 0.5))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.d * s + self.e * lab)[:, None]
