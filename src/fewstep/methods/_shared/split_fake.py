r"""A fake score split by the anchor level σ: one copy per σ-bin, each fitted to the predictions made from its bin.

With ``fake_samples="anchor"`` one fake score models the *mixture* over anchors of the student's x0-predictions,
so the DM gradient at anchor σ, :math:`(\hat x_0^{fake} - \hat x_0^{real})/n`, is the score difference of that
mixture, not of the distribution :math:`p^S_\sigma` of the predictions made from σ. It vanishes once the mixture
matches the data even if one anchor (e.g. the σ = 1 one-step prediction) does not. With K copies, copy k is fitted
only to the predictions whose anchor falls in bin k and gives the DM gradient of exactly those predictions, so
each anchor's fixed point is the data distribution on its own.

Bins: σ = 1 (the one-step prediction) is bin 0; σ < 1 fills bins 1..K−1 uniformly in 1 − σ over (0, 1), so
the uniform n-step grid with K = n puts each of its anchors in its own bin.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap

__all__ = ["SplitFake", "fake_bin"]


def fake_bin(sigma: Tensor, k: int) -> Tensor:
    """Bin of each anchor level: 0 for σ >= 1, else 1 + floor((1 − σ)(K − 1)) clamped to [1, K − 1]; all 0 if K = 1."""
    if k == 1:
        return torch.zeros(sigma.shape, dtype=torch.long, device=sigma.device)
    inner = 1 + ((1.0 - sigma) * (k - 1)).floor().long().clamp(0, k - 2)
    return torch.where(sigma >= 1.0, torch.zeros_like(inner), inner)


class _Routed:
    """A view with ``velocity(x, t, cond)`` that evaluates each row with the copy of its precomputed bin."""

    def __init__(self, copies: nn.ModuleList, bins: Tensor) -> None:
        self.copies, self.bins = copies, bins

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.bins.shape != (x.shape[0],):
            raise ValueError(f"a routed fake score needs one bin per row; got {tuple(self.bins.shape)} bins for "
                             f"{x.shape[0]} rows")
        out = torch.zeros_like(x)
        for k, net in enumerate(self.copies):
            rows = self.bins == k
            if bool(rows.any()):
                out[rows] = net.velocity(x[rows], t[rows], None if cond is None else cond[rows]).to(out.dtype)
        return out


class SplitFake(nn.Module):
    """K copies of a fake-score velocity network, routed by anchor level (:func:`fake_bin`).

    Args:
        fake: The fake score to copy (a velocity FlowMap, e.g. from
            :func:`~fewstep.methods._shared.dm.make_fake_score`).
        k: Number of copies (>= 2).
    """

    def __init__(self, fake: FlowMap, k: int) -> None:
        super().__init__()
        if k < 2:
            raise ValueError(f"a split fake score needs k >= 2 copies; got {k}")
        self.copies = nn.ModuleList([fake] + [copy.deepcopy(fake) for _ in range(k - 1)])

    def route(self, sigma: Tensor) -> _Routed:
        """The view that scores row i with the copy of bin ``fake_bin(sigma[i], K)``."""
        return _Routed(self.copies, fake_bin(sigma, len(self.copies)))
