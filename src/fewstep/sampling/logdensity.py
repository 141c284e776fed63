r"""Log-densities of samples produced by a velocity field (ODE) or by a flow-map student (jumps).

Velocity fields, instantaneous change of variables. Along a trajectory :math:`dx/dt = v(x, t)` the
density of the pushed-forward distribution obeys :math:`\frac{d}{dt}\log q_t(x_t) = -\nabla\!\cdot v(x_t, t)`,
so the augmented state :math:`(x, \ell)` with :math:`d\ell/dt = -\nabla\!\cdot v` is integrated in one pass:

.. math::
    \log q_{t_{end}}(x_{t_{end}}) = \log q_{t_{start}}(x_{t_{start}}) - \int_{t_{start}}^{t_{end}} \nabla\!\cdot v\,dt .

Sampling (t from 1 to 0, :math:`\log q_1 = \log\mathcal N(0, I)`) gives
:math:`\log q_0(x_0) = \log\mathcal N(x_1) + \int_0^1 \nabla\!\cdot v\,dt`; the likelihood direction (data to
noise, t from 0 to 1) gives the same formula read backwards. The divergence is exact (one autograd pass per
dimension) or Hutchinson's :math:`\frac1K\sum_k z_k^\top (\partial v/\partial x) z_k` with probes held fixed
along the path (the estimators are in :mod:`fewstep.sampling.divergence`; :func:`divergence` and
:func:`make_probes` are re-exported here). With ``create_graph=True`` every quantity keeps its graph, so
:math:`\partial \log q/\partial\theta` and :math:`\partial x_{end}/\partial\theta` reach the network's
parameters (both terms of the marginal-alignment regularizer, docs/methods.md §6).

Flow maps (discrete change of variables through jumps) are in :mod:`fewstep.sampling.jump_density`;
:func:`jump_logdet` and :func:`flowmap_logdensity` are re-exported here.

NFE convention: one forward evaluation of the velocity field (with its divergence) counts as one NFE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewstep.core.utils import standard_normal_logprob
from fewstep.sampling.divergence import (
    DIVERGENCE_METHODS,
    check_probes,
    divergence,
    make_probes,
    velocity_and_divergence,
)
from fewstep.sampling.integrators import RK_METHODS, rk_step
from fewstep.sampling.jump_density import flowmap_logdensity, jump_logdet
from fewstep.sampling.samplers import check_grid, time_grid

__all__ = [
    "LogDensityResult",
    "make_probes",
    "divergence",
    "ode_logdensity",
    "sample_with_logdensity",
    "likelihood",
    "standard_normal_logprob",
    "jump_logdet",
    "flowmap_logdensity",
    "FIXED_METHODS",
    "DIVERGENCE_METHODS",
]

FIXED_METHODS: tuple[str, ...] = RK_METHODS


@dataclass
class LogDensityResult:
    """Output of an ODE log-density solve.

    Attributes:
        x: State at the last time of the grid.
        log_q: :math:`\\log q` at ``x`` (for :func:`likelihood`: :math:`\\log q_0` of the input data), shape (batch,).
        nfe: Forward evaluations of the velocity field.
        times: The grid used (for adaptive solves: the two end points).
        trajectory: States at every grid point (first = input) when requested, else None.
        log_q_trajectory: :math:`\\log q` at every grid point when requested, else None.
    """

    x: Tensor
    log_q: Tensor
    nfe: int
    times: Tensor
    trajectory: list[Tensor] | None = field(default=None, repr=False)
    log_q_trajectory: list[Tensor] | None = field(default=None, repr=False)


def ode_logdensity(velocity_fn: Callable[..., Tensor], x: Tensor, grid: Tensor | list[float], log_p_start: Tensor,
                   method: str = "rk4", divergence: str = "exact", probes: Tensor | None = None,
                   num_probes: int = 1, generator: torch.Generator | None = None, create_graph: bool = False,
                   return_trajectory: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
                   **kwargs: Any) -> LogDensityResult:
    r"""Integrate the augmented ODE :math:`dx/dt = v,\ d\log q/dt = -\nabla\!\cdot v` along ``grid``.

    Args:
        velocity_fn: Velocity field ``fn(x, t, **kwargs)``, t of shape (batch,).
        x: State at grid[0], shape (batch, ...).
        grid: Strictly monotone times in [0, 1] (decreasing: noise to data; increasing: data to noise).
            For an adaptive ``method`` only the first and last entries are used.
        log_p_start: :math:`\log q` at grid[0] of each row, shape (batch,).
        method: ``euler``, ``heun``, ``rk4`` (fixed steps on the grid) or a torchdiffeq adaptive method
            (``dopri5``, ``dopri8``, ``bosh3``, ...) with tolerances ``rtol``/``atol``.
        divergence: ``exact`` or ``hutchinson``.
        probes: Hutchinson probes (K, *x.shape); drawn once with :func:`make_probes` when None.
        num_probes: K when probes are drawn here.
        generator: Generator for the probes.
        create_graph: Keep the graph for gradients w.r.t. parameters (and x).
        return_trajectory: Keep x and log q at every grid point (fixed-step methods).
        rtol: Relative tolerance (adaptive methods).
        atol: Absolute tolerance (adaptive methods).
        **kwargs: Passed to the velocity field (cond, guidance, ...).

    Returns:
        The :class:`LogDensityResult` at grid[-1].
    """
    g = check_grid(grid, order="monotone")
    lp = torch.as_tensor(log_p_start, dtype=x.dtype, device=x.device)
    if lp.shape != (x.shape[0],):
        raise ValueError(f"log_p_start must have shape ({x.shape[0]},); got {tuple(lp.shape)}")
    if divergence not in DIVERGENCE_METHODS:
        raise ValueError(f"unknown divergence method {divergence!r}; expected one of {DIVERGENCE_METHODS}")
    if divergence == "hutchinson" and probes is None:
        probes = make_probes(x, num_probes, generator)
    if divergence == "hutchinson":
        check_probes(probes, x)
    nfe = 0

    def fvd(y: Tensor, t: float) -> tuple[Tensor, Tensor]:
        tv = torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device)
        return fvd_vec(y, tv)

    def fvd_vec(y: Tensor, tv: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        return velocity_and_divergence(lambda z, s: velocity_fn(z, s, **kwargs), y, tv, divergence, probes,
                                       create_graph)

    def augmented(state: tuple[Tensor, Tensor], tv: Tensor) -> tuple[Tensor, Tensor]:
        v, div = fvd_vec(state[0], tv)
        return v, -div

    if method in FIXED_METHODS:
        traj = [x] if return_trajectory else None
        ltraj = [lp] if return_trajectory else None
        lq = lp
        for i in range(len(g) - 1):
            x, lq = rk_step(augmented, (x, lq), float(g[i]), float(g[i + 1]), method)
            if traj is not None and ltraj is not None:
                traj.append(x)
                ltraj.append(lq)
        return LogDensityResult(x=x, log_q=lq, nfe=nfe, times=g, trajectory=traj, log_q_trajectory=ltraj)

    from torchdiffeq import odeint

    t0, t1 = float(g[0]), float(g[-1])
    lo, hi, n = min(t0, t1), max(t0, t1), x[0].numel()

    def rhs(t: Tensor, state: Tensor) -> Tensor:
        y = state[:, :n].reshape(x.shape)
        v, dv = fvd(y, min(max(float(t), lo), hi))  # adaptive solvers may probe slightly past the ends
        return torch.cat([v.reshape(x.shape[0], n), -dv[:, None]], dim=1)

    state = torch.cat([x.reshape(x.shape[0], n), lp[:, None]], dim=1)
    span = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    try:
        out = odeint(rhs, state, span, rtol=rtol, atol=atol, method=method)[-1]
    except (ValueError, AssertionError, KeyError) as e:
        if "method" in str(e).lower() or isinstance(e, KeyError):
            raise ValueError(f"unknown ODE method {method!r}; expected one of {FIXED_METHODS} or a torchdiffeq "
                             f"adaptive method such as 'dopri5'") from e
        raise
    return LogDensityResult(x=out[:, :n].reshape(x.shape), log_q=out[:, n], nfe=nfe,
                            times=torch.tensor([t0, t1], dtype=torch.float64))


def sample_with_logdensity(velocity_fn: Callable[..., Tensor], x1: Tensor, grid: Tensor | list[float] | int = 32,
                           **kw: Any) -> LogDensityResult:
    r"""Sample from noise and track :math:`\log q_0(x_0) = \log\mathcal N(x_1) + \int_0^1 \nabla\!\cdot v\,dt`.

    Args:
        velocity_fn: Velocity field ``fn(x, t, **kwargs)``.
        x1: Noise at grid[0] (normally t=1), shape (batch, ...).
        grid: Decreasing times, or an int n for the uniform n-step grid from 1 to 0.
        **kw: Passed to :func:`ode_logdensity` (method, divergence, probes, create_graph, cond, ...).

    Returns:
        The :class:`LogDensityResult`: samples at grid[-1] and their :math:`\log q`.
    """
    g = time_grid(grid) if isinstance(grid, int) else check_grid(grid, order="monotone")
    if float(g[0]) != 1.0 or not bool((g[1:] < g[:-1]).all()):
        raise ValueError(f"sampling needs a decreasing grid starting at t=1 (noise); got {g.tolist()}")
    return ode_logdensity(velocity_fn, x1, g, standard_normal_logprob(x1), **kw)


def likelihood(velocity_fn: Callable[..., Tensor], x0: Tensor, grid: Tensor | list[float] | int | None = None,
               method: str = "dopri5", **kw: Any) -> LogDensityResult:
    r"""Exact log-likelihood of data under the model's ODE, integrating data to noise (t increasing to 1).

    :math:`\log q_{t_0}(x_{t_0}) = \log\mathcal N(x_1) + \int_{t_0}^1 \nabla\!\cdot v(x_t, t)\,dt`. The returned
    ``log_q`` is that of the input points; ``x`` is their noise image at t=1.

    Args:
        velocity_fn: Velocity field ``fn(x, t, **kwargs)``.
        x0: Data points at grid[0] (normally t=0).
        grid: Increasing times ending at 1, an int n for the uniform n-step grid 0 -> 1, or None for [0, 1]
            (use with an adaptive ``method``).
        method: ``dopri5`` (adaptive, default) or euler/heun/rk4 on the grid.
        **kw: Passed to :func:`ode_logdensity` (divergence, probes, rtol, atol, create_graph, cond, ...).

    Returns:
        The :class:`LogDensityResult`: ``log_q`` of the input points and ``x`` their noise image at t=1.
    """
    if grid is None:
        if method in FIXED_METHODS:
            raise ValueError(f"method {method!r} needs a grid (or an int number of steps)")
        grid = [0.0, 1.0]
    g = time_grid(grid, 0.0, 1.0) if isinstance(grid, int) else check_grid(grid, order="monotone")
    if float(g[-1]) != 1.0 or not bool((g[1:] > g[:-1]).all()):
        raise ValueError(f"likelihood needs an increasing grid ending at t=1 (noise); got {g.tolist()}")
    zero = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    res = ode_logdensity(velocity_fn, x0, g, zero, method=method, **kw)
    # res.log_q = -int div dt, so log q_0(x0) = log N(x1) + int div dt
    res.log_q = standard_normal_logprob(res.x) - res.log_q
    if res.log_q_trajectory is not None:
        res.log_q_trajectory = [res.log_q + lq for lq in res.log_q_trajectory]
    return res
