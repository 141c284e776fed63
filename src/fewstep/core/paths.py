r"""Probability paths x_t = alpha(t) x0 + sigma(t) x1 and exact conversions between prediction types.

Notation (fixed for the whole library): data x0 at t=0, Gaussian noise x1 ~ N(0, I) at t=1, sampling runs
from t=1 down to t=0. For an affine path the conditional velocity is
:math:`\dot x_t = \dot\alpha x_0 + \dot\sigma x_1` and the marginal velocity is
:math:`v(x,t) = \dot\alpha \hat x_0 + \dot\sigma \hat x_1` with :math:`\hat x_i = E[x_i | x_t = x]`.
With :math:`\Delta = \alpha\dot\sigma - \dot\alpha\sigma` the conversions are (docs/methods.md §2)

.. math::
    \hat x_1 = (\alpha v - \dot\alpha x)/\Delta,\quad
    \hat x_0 = (\dot\sigma x - \sigma v)/\Delta,\quad
    s = \nabla \log p_t = -\hat x_1/\sigma .

All conversions are affine in the prediction with the same x, so classifier-free guidance
:math:`v_u + w (v_c - v_u)` carries over to every prediction type unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from fewstep.core.utils import TimeLike, as_time, bcast

PredictionType = Literal["velocity", "x0", "noise", "score"]
PREDICTION_TYPES: tuple[str, ...] = ("velocity", "x0", "noise", "score")

__all__ = [
    "AffinePath",
    "LinearPath",
    "CosinePath",
    "GeneralAffinePath",
    "PREDICTION_TYPES",
    "cfg_combine",
    "get_path",
]


def cfg_combine(pred_uncond: Tensor, pred_cond: Tensor, w: float | Tensor) -> Tensor:
    r"""Classifier-free guidance :math:`p_u + w (p_c - p_u)`; w=1 gives the conditional, w=0 the unconditional."""
    if torch.is_tensor(w) and w.dim() == 1:
        w = bcast(w, pred_cond)
    return pred_uncond + w * (pred_cond - pred_uncond)


class AffinePath(ABC):
    """An affine Gaussian probability path x_t = alpha(t) x0 + sigma(t) x1 with alpha(0)=sigma(1)=1."""

    name: str = "affine"

    @abstractmethod
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (alpha, sigma, d_alpha/dt, d_sigma/dt) at times ``t`` (same shape as t)."""

    def _coef(self, t: TimeLike, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tt = as_time(t, x)
        return tuple(bcast(c, x) for c in self.coefficients(tt))  # type: ignore[return-value]

    def sample(self, x0: Tensor, x1: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Return (x_t, dx_t/dt) = (alpha x0 + sigma x1, alpha' x0 + sigma' x1).

        Args:
            x0: Data, shape (batch, ...).
            x1: Noise, same shape.
            t: Times in [0, 1], scalar or shape (batch,).

        Returns:
            (x_t, dx_t/dt), both shaped like ``x0``.
        """
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape; got {tuple(x0.shape)} and {tuple(x1.shape)}")
        a, s, da, ds = self._coef(t, x0)
        return a * x0 + s * x1, da * x0 + ds * x1

    def interpolate(self, x0: Tensor, x1: Tensor, t: TimeLike) -> Tensor:
        r"""The point :math:`x_t = \alpha(t) x_0 + \sigma(t) x_1` alone (the first output of :meth:`sample`)."""
        return self.sample(x0, x1, t)[0]

    # --- conversions from the velocity -------------------------------------------------------------
    def velocity_to_x0(self, v: Tensor, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`\hat x_0 = (\dot\sigma x - \sigma v)/\Delta`."""
        a, s, da, ds = self._coef(t, x)
        return (ds * x - s * v) / (a * ds - da * s)

    def velocity_to_noise(self, v: Tensor, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`\hat x_1 = (\alpha v - \dot\alpha x)/\Delta`."""
        a, s, da, ds = self._coef(t, x)
        return (a * v - da * x) / (a * ds - da * s)

    def velocity_to_score(self, v: Tensor, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`s = -\hat x_1 / \sigma` (singular at t=0, where sigma=0)."""
        _, s, _, _ = self._coef(t, x)
        return -self.velocity_to_noise(v, x, t) / s

    # --- conversions to the velocity ---------------------------------------------------------------
    def x0_to_velocity(self, x0_hat: Tensor, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`v = \dot\alpha \hat x_0 + \dot\sigma (x - \alpha \hat x_0)/\sigma` (singular at t=0)."""
        a, s, da, ds = self._coef(t, x)
        return da * x0_hat + ds * (x - a * x0_hat) / s

    def noise_to_velocity(self, x1_hat: Tensor, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`v = \dot\alpha (x - \sigma\hat x_1)/\alpha + \dot\sigma \hat x_1` (singular where alpha=0)."""
        a, s, da, ds = self._coef(t, x)
        return da * (x - s * x1_hat) / a + ds * x1_hat

    def score_to_velocity(self, score: Tensor, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`\hat x_1 = -\sigma s`; on the linear path this is :math:`v = -(x + t s)/(1-t)`."""
        _, s, _, _ = self._coef(t, x)
        return self.noise_to_velocity(-s * score, x, t)

    def convert(self, pred: Tensor, x: Tensor, t: TimeLike, src: str, dst: str) -> Tensor:
        """Convert a prediction of type ``src`` into type ``dst`` (one of velocity, x0, noise, score)."""
        for name in (src, dst):
            if name not in PREDICTION_TYPES:
                raise ValueError(f"unknown prediction type {name!r}; expected one of {PREDICTION_TYPES}")
        if src == dst:
            return pred
        to_v: dict[str, Callable[[Tensor, Tensor, TimeLike], Tensor]] = {
            "velocity": lambda p, xx, tt: p,
            "x0": self.x0_to_velocity,
            "noise": self.noise_to_velocity,
            "score": self.score_to_velocity,
        }
        from_v: dict[str, Callable[[Tensor, Tensor, TimeLike], Tensor]] = {
            "velocity": lambda p, xx, tt: p,
            "x0": self.velocity_to_x0,
            "noise": self.velocity_to_noise,
            "score": self.velocity_to_score,
        }
        return from_v[dst](to_v[src](pred, x, t), x, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(AffinePath):
    """Rectified-flow / conditional-OT path x_t = (1 - t) x0 + t x1 (the library default)."""

    name = "linear"

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)


class CosinePath(AffinePath):
    r"""Trigonometric (variance-preserving) path x_t = cos(pi t/2) x0 + sin(pi t/2) x1."""

    name = "cosine"

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h = 0.5 * math.pi
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


class GeneralAffinePath(AffinePath):
    """An affine path given by user functions alpha(t), sigma(t); derivatives by autograd unless given.

    Args:
        alpha: Callable mapping a tensor of times to alpha(t), with alpha(0)=1, alpha(1)=0.
        sigma: Callable mapping a tensor of times to sigma(t), with sigma(0)=0, sigma(1)=1.
        d_alpha: Optional derivative of alpha.
        d_sigma: Optional derivative of sigma.

    Raises:
        ValueError: if the boundary values are wrong.
    """

    name = "general"

    def __init__(
        self,
        alpha: Callable[[Tensor], Tensor],
        sigma: Callable[[Tensor], Tensor],
        d_alpha: Callable[[Tensor], Tensor] | None = None,
        d_sigma: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.alpha, self.sigma, self.d_alpha, self.d_sigma = alpha, sigma, d_alpha, d_sigma
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        a, s = alpha(ends), sigma(ends)
        if not (torch.allclose(a, torch.tensor([1.0, 0.0], dtype=a.dtype), atol=1e-6)
                and torch.allclose(s, torch.tensor([0.0, 1.0], dtype=s.dtype), atol=1e-6)):
            raise ValueError(
                "a path needs alpha(0)=1, alpha(1)=0, sigma(0)=0, sigma(1)=1; "
                f"got alpha={a.tolist()}, sigma={s.tolist()}"
            )

    @staticmethod
    def _derivative(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(tt).sum(), tt)
        return g

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        da = self.d_alpha(t) if self.d_alpha is not None else self._derivative(self.alpha, t)
        ds = self.d_sigma(t) if self.d_sigma is not None else self._derivative(self.sigma, t)
        return self.alpha(t), self.sigma(t), da, ds


def get_path(name: str | AffinePath) -> AffinePath:
    """Return a path by name ("linear" or "cosine"), or the path itself."""
    if isinstance(name, AffinePath):
        return name
    paths = {"linear": LinearPath, "cosine": CosinePath}
    if name not in paths:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(paths)} or an AffinePath instance")
    return paths[name]()
