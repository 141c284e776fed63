r"""Samplers for velocity fields (Euler, Heun, RK4 on any grid; adaptive torchdiffeq) and for flow maps
(one-step, multi-step on any grid, CTM gamma-sampling). Every sampler counts network evaluations exactly.

Time grids run from t=1 (noise) down to t=0 (data), strictly decreasing. A velocity field is any callable
``fn(x, t, **kwargs)`` with t of shape (batch,), e.g. a :class:`~fewstep.teachers.Teacher` (kwargs cond,
guidance) or :meth:`FlowMap.velocity`. A flow map is any callable ``f(x, t, s, cond=None)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewstep.sampling.integrators import RK_METHODS, rk_step

__all__ = [
    "SampleResult",
    "NFECounter",
    "time_grid",
    "check_grid",
    "GRID_ORDERS",
    "solve",
    "solve_adaptive",
    "sample_flowmap",
    "gamma_sample",
    "renoise",
    "ODE_METHODS",
]

ODE_METHODS: tuple[str, ...] = RK_METHODS


@dataclass
class SampleResult:
    """Output of a sampler.

    Attributes:
        x: Final samples.
        nfe: Number of network evaluations (one per batched call).
        times: The time grid actually used (for adaptive solves: the two end points).
        trajectory: States at every grid point (first = input) when requested, else None.
    """

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: list[Tensor] | None = field(default=None, repr=False)


class NFECounter:
    """Wrap a callable and count its calls (one batched call = one network evaluation)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn, self.count = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.count += 1
        return self.fn(*args, **kwargs)


def time_grid(n_steps: int, t_start: float = 1.0, t_end: float = 0.0, kind: str = "uniform",
              rho: float = 7.0) -> Tensor:
    r"""A grid of ``n_steps + 1`` float64 times from ``t_start`` to ``t_end`` (the one grid builder).

    ``uniform``: :math:`t_i = t_{start} + (t_{end} - t_{start})\, i/n` (``torch.linspace``), decreasing for
    sampling (default 1 -> 0) or increasing (e.g. 0 -> 1 for likelihoods). ``edm`` (decreasing grids only):
    the noise-to-signal ratio :math:`\eta = t/(1-t)` spaced as :math:`\eta_i^{1/\rho}` evenly (Karras et al.
    2022, EDM), with the end points kept exactly.

    Args:
        n_steps: Number of steps (>= 1).
        t_start: First time (default 1, noise).
        t_end: Last time (default 0, data).
        kind: ``uniform`` or ``edm``.
        rho: EDM exponent.

    Returns:
        The float64 grid, shape (n_steps + 1,).

    Raises:
        ValueError: for n_steps < 1, times outside [0, 1], t_start == t_end, an unknown kind, or an increasing
            ``edm`` grid.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    check_grid(ends, order="monotone" if kind == "uniform" else "decreasing")
    if kind == "uniform":
        return torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64)
    if kind == "edm":
        eta = lambda t: t / max(1 - t, 1e-3)  # noqa: E731
        lo, hi = eta(t_end) ** (1 / rho), eta(min(t_start, 0.999)) ** (1 / rho)
        e = (hi + torch.linspace(0, 1, n_steps + 1, dtype=torch.float64) * (lo - hi)) ** rho
        g = e / (1 + e)
        g[0], g[-1] = t_start, t_end
        return g
    raise ValueError(f"unknown grid kind {kind!r}; expected 'uniform' or 'edm'")


GRID_ORDERS: tuple[str, ...] = ("decreasing", "increasing", "monotone")


def check_grid(grid: Tensor | list[float], order: str = "decreasing") -> Tensor:
    """Validate a time grid (the one grid validator) and return it as a float64 tensor.

    A grid is 1-D with at least two points inside [0, 1] and strictly ``decreasing`` (sampling: t=1 noise ->
    t=0 data), strictly ``increasing`` (data -> noise), or strictly ``monotone`` (either).

    Args:
        grid: The times, a 1-D sequence or tensor.
        order: ``decreasing`` (default), ``increasing`` or ``monotone``.

    Returns:
        The grid as a float64 tensor.

    Raises:
        ValueError: naming the violated rule.
    """
    if order not in GRID_ORDERS:
        raise ValueError(f"unknown grid order {order!r}; expected one of {GRID_ORDERS}")
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.dim() != 1 or g.numel() < 2:
        raise ValueError(f"a time grid needs at least two points in a 1-D sequence; got shape {tuple(g.shape)}")
    if float(g.min()) < 0 or float(g.max()) > 1:
        raise ValueError(f"grid times must lie in [0, 1]; got [{float(g.min())}, {float(g.max())}]")
    dec, inc = bool((g[1:] < g[:-1]).all()), bool((g[1:] > g[:-1]).all())
    if order == "decreasing" and not dec:
        raise ValueError(f"a sampling grid must be strictly decreasing (t=1 noise -> t=0 data); got {g.tolist()}")
    if order == "increasing" and not inc:
        raise ValueError(f"a likelihood grid must be strictly increasing (t=0 data -> t=1 noise); got {g.tolist()}")
    if order == "monotone" and not (dec or inc):
        raise ValueError(f"a time grid must be strictly monotone; got {g.tolist()}")
    return g


def _tvec(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def solve(velocity_fn: Callable[..., Tensor], x: Tensor, grid: Tensor | list[float] | int, method: str = "euler",
          return_trajectory: bool = False, **kwargs: Any) -> SampleResult:
    r"""Integrate :math:`dx/dt = v(x, t)` along ``grid`` with a fixed-step method.

    Args:
        velocity_fn: Velocity field ``fn(x, t, **kwargs)``.
        x: Initial state at grid[0], shape (batch, ...).
        grid: Decreasing times, or an int n for the uniform n-step grid from 1 to 0.
        method: ``euler`` (1 NFE/step, order 1), ``heun`` (2, order 2) or ``rk4`` (4, order 4); the tableaus of
            :mod:`fewstep.sampling.integrators`.
        return_trajectory: Keep the state at every grid point.
        **kwargs: Passed to the velocity field (e.g. cond, guidance).

    Returns:
        The :class:`SampleResult` at grid[-1].
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {ODE_METHODS} (or use solve_adaptive)")
    g = time_grid(grid) if isinstance(grid, int) else check_grid(grid)
    fn = NFECounter(velocity_fn)
    traj = [x] if return_trajectory else None
    for i in range(len(g) - 1):
        x = rk_step(lambda y, tau: fn(y, tau, **kwargs), x, float(g[i]), float(g[i + 1]), method)
        if traj is not None:
            traj.append(x)
    return SampleResult(x=x, nfe=fn.count, times=g, trajectory=traj)


def solve_adaptive(velocity_fn: Callable[..., Tensor], x: Tensor, t_start: float = 1.0, t_end: float = 0.0,
                   rtol: float = 1e-6, atol: float = 1e-6, method: str = "dopri5",
                   return_trajectory: bool = False, n_save: int = 2, **kwargs: Any) -> SampleResult:
    """Integrate with an adaptive torchdiffeq solver (the reference sampler).

    Args:
        velocity_fn: Velocity field ``fn(x, t, **kwargs)``.
        x: Initial state at t_start.
        t_start: Start time.
        t_end: End time (may be larger than t_start to integrate forwards, e.g. data -> noise).
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: A torchdiffeq adaptive method (dopri5, dopri8, bosh3, ...).
        return_trajectory: Return states at ``n_save`` evenly spaced times.
        n_save: Number of saved times when a trajectory is requested.
        **kwargs: Passed to the velocity field.

    Returns:
        The :class:`SampleResult` at t_end.
    """
    from torchdiffeq import odeint

    for name, val in (("t_start", t_start), ("t_end", t_end)):
        if not 0.0 <= float(val) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1]; got {val}")
    fn = NFECounter(velocity_fn)
    n = n_save if return_trajectory else 2
    times = torch.linspace(float(t_start), float(t_end), n, dtype=torch.float64)

    lo, hi = min(float(t_start), float(t_end)), max(float(t_start), float(t_end))

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        # adaptive solvers may probe slightly past the end point; clamp to the valid interval
        return fn(y, _tvec(min(max(float(t), lo), hi), y), **kwargs)

    ys = odeint(rhs, x, times.to(x.device, x.dtype), rtol=rtol, atol=atol, method=method)
    traj = list(ys) if return_trajectory else None
    return SampleResult(x=ys[-1], nfe=fn.count, times=times, trajectory=traj)


def sample_flowmap(flowmap: Callable[..., Tensor], x: Tensor, grid: Tensor | list[float] | int = 1,
                   cond: Tensor | None = None, return_trajectory: bool = False) -> SampleResult:
    r"""Multi-step flow-map sampling :math:`x_{t_{i+1}} = f_{t_i \to t_{i+1}}(x_{t_i})`; one NFE per jump.

    Args:
        flowmap: ``f(x, t, s, cond=None)``, e.g. a :class:`~fewstep.core.flowmap.FlowMap`.
        x: Noise at grid[0], shape (batch, ...).
        grid: Decreasing times, or an int n for the uniform n-step grid from 1 to 0 (1 = one step).
        cond: Optional class labels.
        return_trajectory: Keep the state at every grid point.

    Returns:
        The :class:`SampleResult` at grid[-1].
    """
    g = time_grid(grid) if isinstance(grid, int) else check_grid(grid)
    fn = NFECounter(flowmap)
    traj = [x] if return_trajectory else None
    for i in range(len(g) - 1):
        x = fn(x, _tvec(float(g[i]), x), _tvec(float(g[i + 1]), x), cond=cond)
        if traj is not None:
            traj.append(x)
    return SampleResult(x=x, nfe=fn.count, times=g, trajectory=traj)


def renoise(x_s: Tensor, s: float, t: float, generator: torch.Generator | None = None) -> Tensor:
    r"""Forward kernel of the linear path from s to t >= s, with :math:`z \sim \mathcal N(0, I)`:

    .. math::
        x_t = \tfrac{1-t}{1-s}\,x_s + \sqrt{t^2 - (\tfrac{1-t}{1-s}s)^2}\,z .

    Args:
        x_s: Points at time s.
        s: Current time, 0 <= s < 1.
        t: Target time, s <= t <= 1.
        generator: Optional CPU generator for z.

    Returns:
        Points at time t.
    """
    if t < s or s >= 1:
        raise ValueError(f"renoise needs 0 <= s <= t <= 1 and s < 1; got s={s}, t={t}")
    a = (1 - t) / (1 - s)
    std = math.sqrt(max(t * t - (a * s) ** 2, 0.0))
    z = torch.randn(x_s.shape, generator=generator, dtype=x_s.dtype).to(x_s.device)
    return a * x_s + std * z


def gamma_sample(flowmap: Callable[..., Tensor], x: Tensor, grid: Tensor | list[float] | int, gamma: float = 0.0,
                 cond: Tensor | None = None, generator: torch.Generator | None = None,
                 return_trajectory: bool = False) -> SampleResult:
    r"""CTM gamma-sampling on the linear path.

    From :math:`t_i`, jump deterministically to :math:`u` with noise-to-signal ratio
    :math:`\eta_u = \sqrt{1-\gamma^2}\,\eta_{t_{i+1}}` (:math:`\eta = t/(1-t)`), then re-noise to
    :math:`t_{i+1}` with fresh Gaussian noise. gamma=0 is deterministic multi-step flow-map sampling;
    gamma=1 jumps to data and re-noises (multi-step consistency sampling). One NFE per step.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1]; got {gamma}")
    g = time_grid(grid) if isinstance(grid, int) else check_grid(grid)
    fn = NFECounter(flowmap)
    traj = [x] if return_trajectory else None
    for i in range(len(g) - 1):
        t, tn = float(g[i]), float(g[i + 1])
        if tn <= 0.0 or gamma == 0.0:
            u = tn
        else:
            eta = math.sqrt(1 - gamma**2) * tn / (1 - tn)
            u = eta / (1 + eta)
        x = fn(x, _tvec(t, x), _tvec(u, x), cond=cond)
        if u < tn:
            x = renoise(x, u, tn, generator)
        if traj is not None:
            traj.append(x)
    return SampleResult(x=x, nfe=fn.count, times=g, trajectory=traj)
