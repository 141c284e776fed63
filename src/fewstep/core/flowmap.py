r"""Flow maps: every student in fewstep is f_{t->s}(x) = c_skip(t,s) x + c_out(t,s) F_theta(x, t, s').

On the linear path all parameterizations below have c_skip = 1 and c_out = s - t, so
:math:`f_{t\to s}(x) = x - (t-s) F` and the boundary condition :math:`f_{t\to t} = \mathrm{id}` holds
exactly for any network. They differ in which second time s' the network sees:

* ``average_velocity`` (MeanFlow, AYF, Shortcut, IMM, SplitMeanFlow): s' = s, F is the average velocity
  :math:`\frac{1}{t-s}\int_s^t v(x_\tau,\tau)d\tau`; the instantaneous velocity is F(x, t, t).
* ``consistency`` (CM, sCM, FACM): s' = 0, F(x,t,0) predicts (x - x0_hat)/t, i.e. f_{t->0} = x - t F;
  a jump to s > 0 is the deterministic DDIM re-noising (1-s) x0_hat + s x1_hat = x - (t-s) F.
* ``velocity`` (reflow, PeRFlow, teachers trained by flow matching): s' = t, F is a velocity and
  f_{t->s} is one Euler step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.utils import TimeLike, as_time, bcast

Parameterization = Literal["average_velocity", "consistency", "velocity"]
PARAMETERIZATIONS: tuple[str, ...] = ("average_velocity", "consistency", "velocity")

__all__ = ["FlowMap", "PARAMETERIZATIONS", "VelocityFlowMap"]


class FlowMap(nn.Module):
    """A flow-map student wrapping a backbone F_theta(x, t, s, cond).

    Args:
        net: Backbone called as ``net(x, t, s, cond)``; see :mod:`fewstep.networks.mlp`.
        parameterization: One of ``average_velocity``, ``consistency``, ``velocity``.

    Example:
        >>> from fewstep.networks.mlp import MLP
        >>> f = FlowMap(MLP(2), "average_velocity")
        >>> x = torch.randn(4, 2)
        >>> torch.equal(f(x, 0.5, 0.5), x)
        True
    """

    def __init__(self, net: nn.Module, parameterization: str = "average_velocity") -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
        self.net = net
        self.parameterization = parameterization

    def _check_input(self, x: Tensor) -> Tensor:
        """Cast x to the student's dtype and device; a wrong event shape is a ValueError naming both shapes."""
        event = getattr(self.net, "event_shape", None)
        if not torch.is_tensor(x):
            raise TypeError(f"flow-map input must be a tensor, got {type(x).__name__}")
        if event is not None and tuple(x.shape[1:]) != tuple(event):
            raise ValueError(f"flow-map input must have shape (batch, {', '.join(map(str, event))}); "
                             f"got {tuple(x.shape)}")
        p = next(self.net.parameters(), None)
        if p is not None and (x.dtype != p.dtype or x.device != p.device):
            if not x.is_floating_point():
                raise TypeError(f"flow-map input must be a floating-point tensor, got {x.dtype}")
            x = x.to(device=p.device, dtype=p.dtype)
        return x

    def network_s(self, t: Tensor, s: Tensor) -> Tensor:
        """The second time the backbone sees for a jump t -> s (see module docstring)."""
        if self.parameterization == "average_velocity":
            return s
        if self.parameterization == "consistency":
            return torch.zeros_like(t)
        return t

    def F(self, x: Tensor, t: TimeLike, s: TimeLike, cond: Tensor | None = None) -> Tensor:
        """Raw backbone output F_theta(x, t, s') with s' chosen by the parameterization."""
        tt, ss = as_time(t, x, "t"), as_time(s, x, "s")
        return self.net(x, tt, self.network_s(tt, ss), cond)

    def c_skip_c_out(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Return (c_skip, c_out) = (1, s - t) for all built-in parameterizations."""
        return torch.ones_like(t), s - t

    def forward(self, x: Tensor, t: TimeLike, s: TimeLike, cond: Tensor | None = None) -> Tensor:
        r"""Jump :math:`f_{t\to s}(x) = c_{skip} x + c_{out} F_\theta(x, t, s')`; t, s scalars or shape (batch,)."""
        x = self._check_input(x)
        tt, ss = as_time(t, x, "t"), as_time(s, x, "s")
        if bool((ss > tt).any()):
            raise ValueError(f"a flow map jumps from t down to s <= t (t=1 noise, s=0 data); got s > t "
                             f"(t={float(tt.min()):g}.., s={float(ss.max()):g}..)")
        c_skip, c_out = self.c_skip_c_out(tt, ss)
        return bcast(c_skip, x) * x + bcast(c_out, x) * self.net(x, tt, self.network_s(tt, ss), cond)

    def velocity(self, x: Tensor, t: TimeLike, cond: Tensor | None = None) -> Tensor:
        r"""Instantaneous velocity :math:`v(x,t) = \partial_s f_{t\to s}(x)|_{s=t} = F(x, t, t')` (f = x + (s-t)F)."""
        return self.F(x, t, t, cond)

    def x0(self, x: Tensor, t: TimeLike, cond: Tensor | None = None) -> Tensor:
        """Jump all the way to data, f_{t->0}(x)."""
        return self.forward(x, t, 0.0, cond)


class VelocityFlowMap(nn.Module):
    """Turn any velocity field v(x, t, cond) into a flow map by one Euler step, f_{t->s} = x - (t-s) v(x,t).

    Args:
        velocity_fn: Callable or module evaluated as ``velocity_fn(x, t, cond)`` with t of shape (batch,).
    """

    parameterization = "velocity"

    def __init__(self, velocity_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.velocity_fn = velocity_fn

    def velocity(self, x: Tensor, t: TimeLike, cond: Tensor | None = None) -> Tensor:
        return self.velocity_fn(x, as_time(t, x, "t"), cond)

    def forward(self, x: Tensor, t: TimeLike, s: TimeLike, cond: Tensor | None = None) -> Tensor:
        tt, ss = as_time(t, x, "t"), as_time(s, x, "s")
        return x - bcast(tt - ss, x) * self.velocity_fn(x, tt, cond)
