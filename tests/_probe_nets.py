"""Probe networks for loss-equation tests: outputs and derivatives are explicit formulas, computed by hand."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.methods import Batch
from fewstep.teachers import GaussianMixtureTeacher


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



class LabelTimeProbe(LinearProbe):
    """:class:`LinearProbe` plus a label-time product: F = a x + b t + d s + e c + k c t (k starts at 0.8).

    The c t term makes the guided velocity depend on t, so a JVP along (v, 1, 0) sees the label.
    """

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return super().forward(x, t, s, cond) + (self.k * lab * t)[:, None]

def two_class_teacher(dtype: torch.dtype = torch.float64) -> GaussianMixtureTeacher:
    """A 2-D, two-component, class-conditional analytic teacher (one class per component, covariance 0.3 I)."""
    cov = torch.eye(2, dtype=dtype)[None].repeat(2, 1, 1) * 0.3
    return GaussianMixtureTeacher([0.5, 0.5], [[2.0, 0.0], [-1.0, 1.5]], cov, classes=[0, 1])


def random_batch(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Batch:
    """A seeded batch: noise x1, 8 uniforms per row, data x0 ~ N(1, I) and labels in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    return Batch(x1=torch.randn(n, 2, generator=g, dtype=dtype), u=torch.rand(n, 8, generator=g, dtype=dtype),
                 x0=torch.randn(n, 2, generator=g, dtype=dtype) + 1.0, cond=torch.randint(0, 2, (n,), generator=g))


def batch_velocity_by_hand(x_t: Tensor, t: Tensor, x0: Tensor, cond: Tensor) -> Tensor:
    r""":math:`\hat v_i = (x_t^i - \sum_j w_{ij} x_0^j)/t_i`, :math:`w_{ij} \propto
    \exp(-\|x_t^i - (1-t_i)x_0^j\|^2/2t_i^2)` over the rows j with the label of row i, one row at a time (the
    labelled batch velocity of ct and imm, written out)."""
    out = []
    for i in range(len(x_t)):
        same = [j for j in range(len(x0)) if int(cond[j]) == int(cond[i])]
        logw = torch.stack([-((x_t[i] - (1 - t[i]) * x0[j]) ** 2).sum() / (2 * t[i] ** 2) for j in same])
        w = torch.softmax(logw, 0)
        out.append((x_t[i] - (w[:, None] * x0[same]).sum(0)) / t[i])
    return torch.stack(out)
