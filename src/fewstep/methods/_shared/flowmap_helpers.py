r"""Helpers of the flow-map training methods (MeanFlow, SplitMeanFlow, sCM, FACM, AYF): time sampling, MeanFlow's
adaptive weight, sCM's tangent normalisation and warm-up, and the per-sample squared norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fewstep.core.timesteps import sample_time
from fewstep.core.utils import bcast
from fewstep.methods.base import U_AUX, U_CORNER, U_S, U_SELECT, U_T, U_ZERO

if TYPE_CHECKING:
    from fewstep.methods._shared.flowmap_base import FlowMapTrainConfig

__all__ = ["sq_norm", "adaptive_weight", "tangent_normalize", "warmup_ratio", "sample_t_s", "consistency_time"]


def sq_norm(x: Tensor) -> Tensor:
    r"""Per-sample squared norm :math:`\|x_i\|^2` summed over the event dimensions, shape (B,)."""
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


def adaptive_weight(delta: Tensor, p: float, c: float) -> Tensor:
    r"""MeanFlow's adaptive loss :math:`\Delta / \mathrm{sg}((\Delta + c)^p)` per sample (p = 0: plain Δ).

    Its gradient is that of :math:`\Delta` scaled by :math:`(\Delta + c)^{-p}`, so p = 1 behaves like a
    robust (log-like) loss that stops outliers from dominating.
    """
    if p == 0:
        return delta
    return delta / (delta.detach() + c).pow(p)


def tangent_normalize(g: Tensor, c: float) -> Tensor:
    r"""sCM tangent normalisation :math:`g / (\|g\| + c)` with the per-sample L2 norm (c <= 0: no-op)."""
    if c <= 0:
        return g
    return g / bcast(g.reshape(g.shape[0], -1).norm(dim=1) + c, g)


def warmup_ratio(step: int, warmup_steps: int, r_max: float = 1.0) -> float:
    r"""Linear tangent warm-up :math:`r = r_{max}\min(1, \text{step}/\text{warmup\_steps})` (r_max if no warm-up)."""
    if warmup_steps <= 0:
        return float(r_max)
    return float(r_max) * min(1.0, max(step, 0) / warmup_steps)


def sample_t_s(u: Tensor, kind: str, mean: float, std: float, equal_fraction: float, t_min: float = 0.0,
               t_max: float = 1.0, corner_fraction: float = 0.0,
               zero_fraction: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""Draw (t, s) with :math:`t \ge s`: two draws from p(t), ordered; then s = t, s = t_min or the corner.

    Rows with :math:`u_2 <` ``equal_fraction`` get s = t. Rows with :math:`u_5 <` ``zero_fraction`` get
    s = t_min with their drawn t (a jump to data, the last jump of every sampler; overrides s = t). Rows with
    :math:`u_4 <` ``corner_fraction`` get the longest jump :math:`(t, s) = (t_{max}, t_{min})` (= (1, 0) by
    default), the one a 1-step sampler takes; the corner overrides both.

    Args:
        u: Uniforms of shape (B, >=3) (>= 5 when corner_fraction > 0, >= 6 when zero_fraction > 0); columns
            0, 1 give the two times, column 2 the s = t choice, column 4 the corner choice, column 5 the s = t_min
            choice.
        kind: ``uniform`` or ``logit_normal``.
        mean: Logit-normal location.
        std: Logit-normal scale.
        equal_fraction: Fraction of rows with s = t (before the corner rows).
        t_min: Smallest time.
        t_max: Largest time.
        corner_fraction: Fraction of rows at (t_max, t_min).
        zero_fraction: Fraction of rows with s = t_min and t from p(t).

    Returns:
        (t, s), each of shape (B,), with t >= s.
    """
    if not all(0.0 <= f <= 1.0 for f in (equal_fraction, corner_fraction, zero_fraction)):
        raise ValueError(f"equal_fraction, corner_fraction and zero_fraction must lie in [0, 1]; got "
                         f"{equal_fraction}, {corner_fraction}, {zero_fraction}")
    a = sample_time(u[:, U_T], kind, t_min, t_max, mean, std)
    b = sample_time(u[:, U_S], kind, t_min, t_max, mean, std)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    s = torch.where(u[:, U_SELECT] < equal_fraction, t, s)
    if zero_fraction > 0:
        if u.shape[1] < 6:
            raise ValueError(f"zero_fraction > 0 needs uniforms u of shape (B, >=6); got {tuple(u.shape)}")
        s = torch.where(u[:, U_ZERO] < zero_fraction, torch.full_like(s, t_min), s)
    if corner_fraction > 0:
        if u.shape[1] < 5:
            raise ValueError(f"corner_fraction > 0 needs uniforms u of shape (B, >=5); got {tuple(u.shape)}")
        corner = u[:, U_CORNER] < corner_fraction
        t = torch.where(corner, torch.full_like(t, t_max), t)
        s = torch.where(corner, torch.full_like(s, t_min), s)
    return t, s


def consistency_time(u: Tensor, cfg: FlowMapTrainConfig, t_one_fraction: float) -> Tensor:
    r"""Training times of a consistency student: :math:`t \sim p(t)` on [t_min, t_max] (column 0 of ``u``), and
    :math:`t = t_{max}` exactly on the rows with ``u[:, 3] < t_one_fraction``.

    The 1-step sampler queries only :math:`F(x, 1, 0)`; a logit-normal p(t) puts almost no mass there
    (logit-normal(-0.4, 1): P(t > 0.95) = 4e-4), so the point mass at t = 1 trains the jump the sampler uses.
    """
    if not 0.0 <= t_one_fraction <= 1.0:
        raise ValueError(f"t_one_fraction must lie in [0, 1]; got {t_one_fraction}")
    t = sample_time(u[:, U_T], cfg.time_sampler, cfg.t_min, cfg.t_max, cfg.logit_mean, cfg.logit_std)
    if t_one_fraction > 0:
        t = torch.where(u[:, U_AUX] < t_one_fraction, torch.full_like(t, cfg.t_max), t)
    return t
