r"""The marginal velocity of the linear path estimated from a batch of data (no teacher), shared by ``ct``
(``velocity: batch``, :mod:`fewstep.methods.consistency`) and ``imm`` (``interpolant: batch``,
:mod:`fewstep.methods.imm`): the stable-target-field estimate of Xu et al. (2023).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_velocity"]


def batch_velocity(x_t: Tensor, t: Tensor, x0: Tensor, cond: Tensor | None = None) -> Tensor:
    r"""Marginal velocity from a batch of data, the stable-target-field estimate (Xu et al. 2023).

    With the empirical data distribution :math:`\{x_0^j\}` as the prior,
    :math:`\hat x_0(x_t) = \sum_j w_j x_0^j`, :math:`w_j \propto \exp(-\|x_t - (1-t)x_0^j\|^2 / 2t^2)`, and
    :math:`\hat v = (x_t - \hat x_0)/t`. It tends to :math:`E[x_1 - x_0 \mid x_t]` as the batch grows; with one
    row it is that row's conditional velocity :math:`x_1 - x_0`.

    Args:
        x_t: Points, shape (B, ...), each at its own time.
        t: Times, shape (B,), in (0, 1] (clamped below at 1e-6).
        x0: The batch's data, shape (N, ...) (usually the rows x_t was made from).
        cond: Class labels of the rows (B = N); the weights then cover the rows of the same label only.

    Returns:
        :math:`\hat v`, shape of ``x_t``.
    """
    a, b = x_t.flatten(1).double(), x0.flatten(1).double()
    tt = t.double().clamp(min=1e-6)
    c = (1 - tt)[:, None]
    d2 = a.pow(2).sum(1, keepdim=True) - 2 * c * (a @ b.T) + c * c * b.pow(2).sum(1)[None]
    logits = -d2 / (2 * tt[:, None] ** 2)
    if cond is not None:
        logits = logits.masked_fill(cond[:, None] != cond[None, :], float("-inf"))
    w = torch.softmax(logits, dim=1)
    return ((a - w @ b) / tt[:, None]).to(x_t.dtype).reshape(x_t.shape)
