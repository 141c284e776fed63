"""Small helpers shared by the whole library: time checking, broadcasting, unregistered module attributes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

TimeLike = float | int | Tensor

__all__ = ["TimeLike", "as_time", "bcast", "check_batch", "count_dims", "set_unregistered",
           "per_sample_sq_norm", "per_sample_mean_sq", "standard_normal_logprob"]


def as_time(t: TimeLike, x: Tensor, name: str = "t", check_range: bool = True) -> Tensor:
    """Return ``t`` as a tensor of shape (batch,) on ``x``'s device and dtype.

    Args:
        t: A Python number, a 0-d tensor or a tensor of shape (batch,).
        x: The batch the times belong to, shape (batch, ...).
        name: Name used in error messages.
        check_range: Whether to require ``0 <= t <= 1``.

    Returns:
        Tensor of shape (batch,).

    Raises:
        ValueError: if the shape does not match the batch or a time lies outside [0, 1].
    """
    b = x.shape[0]
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=torch.float64)  # keep float64 precision of Python floats
    t = t.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if t.dim() == 0:
        t = t.expand(b)
    elif t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != b:
        raise ValueError(
            f"{name} must be a scalar or have shape ({b},) to match the batch; got shape {tuple(t.shape)}"
        )
    if check_range and t.numel() > 0:
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0 or t.isnan().any():
            raise ValueError(f"{name} must lie in [0, 1] (t=0 data, t=1 noise); got values in [{lo}, {hi}]")
    return t


def bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (batch,) tensor so that it broadcasts against ``x`` of shape (batch, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def count_dims(x: Tensor) -> int:
    """Number of event dimensions of a batch ``x`` of shape (batch, ...)."""
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n


def per_sample_sq_norm(x: Tensor, batch_dims: int = 1) -> Tensor:
    r"""Squared Euclidean norm of each sample, :math:`\|x_b\|^2 = \sum_i x_{b,i}^2` over all event dimensions.

    The per-sample error convention "sum over event dims, then average over the batch": the consistency, sCM,
    MeanFlow, AYF, Shortcut and SplitMeanFlow losses, ``coupling_error``'s ``mse``, the straightness integrand
    and :math:`\log\mathcal N(x; 0, I)`. It grows with the dimension D (see docs/methods.md, metric conventions).

    Args:
        x: Tensor of shape (*batch, *event) with ``batch_dims`` leading batch dimensions.
        batch_dims: Number of leading dimensions kept (default 1: shape (B, ...) -> (B,)).

    Returns:
        Tensor of shape ``x.shape[:batch_dims]``.
    """
    return x.reshape(*x.shape[:batch_dims], -1).pow(2).sum(-1)


def per_sample_mean_sq(x: Tensor, batch_dims: int = 1) -> Tensor:
    r"""Mean square of each sample, :math:`\frac1D\sum_i x_{b,i}^2 = \|x_b\|^2 / D` (FACM's per-sample MSE).

    Its batch mean is the element-wise MSE ``x.pow(2).mean()`` of the flow-matching, reflow, PeRFlow and
    distribution-matching losses (equal in exact arithmetic; the summation order differs). Independent of D.

    Args:
        x: Tensor of shape (*batch, *event) with ``batch_dims`` leading batch dimensions.
        batch_dims: Number of leading dimensions kept.

    Returns:
        Tensor of shape ``x.shape[:batch_dims]``.
    """
    return x.reshape(*x.shape[:batch_dims], -1).pow(2).mean(-1)


def check_batch(x: Tensor, event_shape: tuple[int, ...], name: str = "x") -> None:
    """Raise a ValueError naming the problem when ``x`` is not a batch of ``event_shape`` events."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(
            f"{name} must have shape (batch, {', '.join(map(str, event_shape))}); got {tuple(x.shape)}"
        )


def set_unregistered(module: nn.Module, name: str, value: Any) -> None:
    """Set ``module.name = value`` without registering ``value`` as a sub-module.

    The one place that keeps a network out of a module's tree: a frozen teacher (or a map built on it) stored
    this way is never returned by ``parameters()``/``state_dict()``, never cast by ``.to()`` and never trained or
    saved with its owner, but reads as a plain attribute.
    """
    module.__dict__[name] = value


def standard_normal_logprob(x: Tensor) -> Tensor:
    r""":math:`\log\mathcal N(x; 0, I) = -\tfrac12\|x\|^2 - \tfrac d2\log 2\pi` per row, shape (batch,)."""
    return -0.5 * per_sample_sq_norm(x) - 0.5 * x[0].numel() * math.log(2 * math.pi)
