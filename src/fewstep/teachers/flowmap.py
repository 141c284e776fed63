r"""The exact teacher flow map: an accurate ODE solve of any teacher between any t and s.

For per-sample times the solve runs in a normalised time :math:`\tau \in [0, 1]` with
:math:`t(\tau) = t + \tau (s - t)` and :math:`dx/d\tau = (s - t)\, v(x, t(\tau))`, so one batched solve
handles a different (t, s) for every row. This is the oracle every distillation loss is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.utils import TimeLike, as_time, bcast
from fewstep.sampling.integrators import RK_METHODS, rk_step
from fewstep.sampling.samplers import time_grid

__all__ = ["TeacherFlowMap"]


class TeacherFlowMap(nn.Module):
    """f_{t->s}(x) of a velocity field by an adaptive (default) or fixed-step ODE solve.

    Args:
        velocity_fn: Velocity field ``fn(x, t, cond=None, **kwargs)``, e.g. a teacher.
        method: ``dopri5`` (adaptive, torchdiffeq) or one of euler/heun/rk4 for a fixed-step solve.
        rtol: Relative tolerance of the adaptive solver.
        atol: Absolute tolerance of the adaptive solver.
        steps: Number of steps of a fixed-step solve.
        **velocity_kwargs: Extra arguments for the velocity field (e.g. guidance=2.0).
    """

    parameterization = "exact"

    def __init__(self, velocity_fn: Callable[..., Tensor], method: str = "dopri5", rtol: float = 1e-7,
                 atol: float = 1e-7, steps: int = 32, **velocity_kwargs: Any) -> None:
        super().__init__()
        self.velocity_fn, self.method, self.rtol, self.atol, self.steps = velocity_fn, method, rtol, atol, steps
        self.velocity_kwargs = velocity_kwargs
        self.nfe = 0

    def velocity(self, x: Tensor, t: TimeLike, cond: Tensor | None = None) -> Tensor:
        """The underlying instantaneous velocity."""
        return self.velocity_fn(x, as_time(t, x), cond=cond, **self.velocity_kwargs)

    def forward(self, x: Tensor, t: TimeLike, s: TimeLike, cond: Tensor | None = None) -> Tensor:
        tt, ss = as_time(t, x, "t"), as_time(s, x, "s")
        h = bcast(ss - tt, x)

        def rhs(tau: Tensor, y: Tensor) -> Tensor:
            self.nfe += 1
            tau_c = min(max(float(tau), 0.0), 1.0)  # adaptive solvers may overshoot
            return h * self.velocity_fn(y, tt + tau_c * (ss - tt), cond=cond, **self.velocity_kwargs)

        if self.method in RK_METHODS:
            taus = time_grid(self.steps, 0.0, 1.0)
            y = x
            for i in range(self.steps):
                y = rk_step(lambda z, tv: rhs(tv[0], z), y, float(taus[i]), float(taus[i + 1]), self.method)
            return y
        from torchdiffeq import odeint

        span = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        return odeint(rhs, x, span, rtol=self.rtol, atol=self.atol, method=self.method)[-1]
