r"""One dict of metrics for a sample set, a flow-map student, or a velocity field under an ODE solver.

Everything is measured against an analytic :class:`~fewstep.teachers.GaussianMixtureTeacher` p_0:

* ``mmd2`` vs reference samples (default: exact mixture samples from an independent seed);
* ``mean_loglik`` (exact mean log p_0), ``modes_covered`` / ``off_mode``
  (:func:`~fewstep.evaluation.metrics.mode_coverage`);
* ``w2`` (exact OT) and, for d > 2, ``sliced_w2``;
* ``coupling_l2`` / ``coupling_mse`` vs the teacher's adaptive ODE endpoint from the same noise;
* for 64-D digits ``fd_digits`` vs the reference and ``fd_digits_real`` vs the 1797 real digits;
* in dimension <= ``kl_max_dim`` (default 2) ``kl``/``tv`` of the sampler's pushforward q
  (:func:`fewstep.evaluation.divergences.valid_kl_tv`): by importance sampling,
  :math:`KL(q\|p_0) = E_q[\log q - \log p_0]`, with log q from the change of variables
  (:mod:`fewstep.sampling.logdensity`; jump log-determinants for flow maps and fixed-step solvers, the augmented ODE
  for adaptive solvers) when the map does not fold, reported with ``fold_fraction`` (share of samples with
  det ∂f/∂x <= 0) and the density check ``w_mean`` ± ``w_se`` = :math:`E_q[p_0/q]` (<= 1 for a valid density);
  when the map folds, or the sampler is stochastic, ``kl``/``tv`` are the density-free k-NN estimates
  ``kl_knn``/``tv_knn`` (k-NN entropy of the samples with the exact log p_0; reported beside the importance-sampled
  ones in any case, with their values for exact samples ``kl_knn_floor``/``tv_knn_floor``); ``kl_from_cov``
  says which (1 or 0).

Noise is :math:`x_1 \sim N(0, I)` from ``torch.Generator().manual_seed(seed)`` in float64 (see :func:`noise`),
so every evaluator with the same seed starts from the same points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fewstep.evaluation.digit_features import frechet_digits
from fewstep.evaluation.metrics import coupling_error, mean_loglik, mmd2, mode_coverage, sliced_w2, w2
from fewstep.evaluation.valid_kl import valid_kl_tv
from fewstep.sampling.integrators import rk_step
from fewstep.sampling.logdensity import flowmap_logdensity, ode_logdensity, standard_normal_logprob
from fewstep.sampling.samplers import ODE_METHODS, check_grid, sample_flowmap, solve, solve_adaptive, time_grid
from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = ["noise", "reference_samples", "teacher_endpoint", "evaluate_samples", "evaluate_flowmap",
           "evaluate_velocity_solver", "evaluate_teacher_solver", "REFERENCE_SEED_OFFSET"]

REFERENCE_SEED_OFFSET = 1_000_003
DENSITY_FREE_SEED_OFFSET = 2_000_029  # exact samples giving the floor of the k-NN KL/TV


def noise(n: int, teacher: GaussianMixtureTeacher, seed: int = 0) -> Tensor:
    """The evaluation noise x1 ~ N(0, I), shape (n, *event_shape), float64, from generator seed ``seed``."""
    if n < 2:
        raise ValueError(f"need n >= 2 samples, got {n}")
    return torch.randn((n, *teacher.event_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_samples(teacher: GaussianMixtureTeacher, n: int, seed: int = 0, cond: Tensor | None = None) -> Tensor:
    """Exact mixture samples p_0 (float64) from seed ``seed + REFERENCE_SEED_OFFSET`` (independent of :func:`noise`)."""
    g = torch.Generator().manual_seed(seed + REFERENCE_SEED_OFFSET)
    return teacher.sample(n, cond=cond, generator=g, dtype=torch.float64)


def teacher_endpoint(teacher: GaussianMixtureTeacher, x1: Tensor, cond: Tensor | None = None, rtol: float = 1e-5,
                     atol: float = 1e-5) -> tuple[Tensor, int]:
    """The teacher's adaptive (dopri5) ODE endpoint x_0 from noise x1 and its NFE."""
    with torch.no_grad():
        res = solve_adaptive(teacher, x1.to(torch.float64), rtol=rtol, atol=atol, cond=cond)
    return res.x, res.nfe


def evaluate_samples(x: Tensor, teacher: GaussianMixtureTeacher, reference: Tensor | None = None,
                     cond: Tensor | None = None, x_teacher: Tensor | None = None, log_q: Tensor | None = None,
                     seed: int = 0, fold_fraction: float = 0.0, density_free: bool = False) -> dict[str, float]:
    """All sample metrics of ``x`` against the mixture ``teacher`` (see the module docstring).

    Args:
        x: Samples, shape (n, *event_shape).
        teacher: The target mixture.
        reference: Reference samples for MMD²/W2/Fréchet; default exact mixture samples (seeded by ``seed``).
        cond: Labels of the samples (shape (n,)) for conditional targets.
        x_teacher: The teacher's ODE endpoints from the same noise (enables coupling metrics).
        log_q: Change-of-variables log q(x) of the sampler at ``x`` (enables KL/TV by importance sampling, refused
            when the map folds).
        seed: Seed of the default reference samples.
        fold_fraction: Share of samples at which the map that made ``x`` has det <= 0 (with ``log_q``).
        density_free: Also estimate KL/TV without the sampler's density (k-NN entropy of ``x`` and the exact
            log p_0; dimension <= 3), with the value for n exact samples as floor.

    Returns:
        Metric name -> value (``mmd2``, ``mean_loglik``, ``modes_covered``, ``off_mode``, ``w2``, and the
        optional ones enabled by the inputs and the dimension).
    """
    if tuple(x.shape[1:]) != tuple(teacher.event_shape):
        raise ValueError(f"samples must have shape (n, {teacher.event_shape}); got {tuple(x.shape)}")
    x = x.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("samples contain NaN or inf")
    ref = reference_samples(teacher, x.shape[0], seed, cond) if reference is None else reference.detach().cpu()
    out: dict[str, float] = {"mmd2": mmd2(x, ref), "mean_loglik": mean_loglik(x, teacher, cond)}
    cov = mode_coverage(x, teacher, cond=cond)
    out["modes_covered"] = float(cov["modes_covered"])  # type: ignore[arg-type]
    out["off_mode"] = float(cov["off_mode"])  # type: ignore[arg-type]
    out["w2"] = w2(x, ref)
    if teacher.dim > 2:
        out["sliced_w2"] = sliced_w2(x, ref, generator=torch.Generator().manual_seed(seed))
    if x_teacher is not None:
        ce = coupling_error(x, x_teacher)
        out["coupling_l2"], out["coupling_mse"] = ce["mean_l2"], ce["mse"]
    if teacher.dim == 64:
        from sklearn.datasets import load_digits

        real = torch.as_tensor(load_digits().data, dtype=torch.float64) / 8.0 - 1.0
        out["fd_digits"] = frechet_digits(x, ref)
        out["fd_digits_real"] = frechet_digits(x, real)
    if log_q is not None or (density_free and teacher.dim <= 3):
        floor = None
        if density_free and teacher.dim <= 3:
            g = torch.Generator().manual_seed(seed + DENSITY_FREE_SEED_OFFSET)
            floor = teacher.sample(x.shape[0], cond=cond, generator=g, dtype=torch.float64)
        out.update(valid_kl_tv(x, None if log_q is None else log_q.detach().to(torch.float64).cpu(),
                               lambda z: teacher.log_prob(z, 0.0, cond).cpu(), fold_fraction,
                               floor=floor if density_free else None, max_dim=3 if density_free else 0))
    return out


def _model_dtype(module: Any) -> torch.dtype:
    params = list(module.parameters()) if hasattr(module, "parameters") else []
    return params[0].dtype if params else torch.float64


def evaluate_flowmap(flowmap: Callable[..., Tensor], teacher: GaussianMixtureTeacher, nfe: Sequence[int] = (1, 2, 4),
                     n: int = 2000, seed: int = 0, cond: Tensor | None = None,
                     kl_max_dim: int = 2, sampler: Any = None) -> dict[int, dict[str, float]]:
    """Metrics of a flow-map student sampled with k uniform jumps from 1 to 0, for each k in ``nfe``.

    ``sampler`` (a :class:`~fewstep.sampling.spec.SamplerSpec`, default deterministic uniform jumps) picks the
    multi-step sampler; a stochastic one (gamma > 0) re-noises from a generator seeded by ``seed`` and has no KL/TV.

    Coupling error is measured against the teacher's adaptive endpoint from the same noise. When d <= kl_max_dim,
    KL/TV come from the change-of-variables density of the k-jump map
    (:func:`~fewstep.sampling.logdensity.flowmap_logdensity`) if no jump folds, else (and for stochastic samplers)
    from the density-free k-NN estimators; see the module docstring.
    """
    x1 = noise(n, teacher, seed)
    x_t, _ = teacher_endpoint(teacher, x1, cond)
    ref = reference_samples(teacher, n, seed, cond)
    dtype = _model_dtype(flowmap)
    results: dict[int, dict[str, float]] = {}
    for k in nfe:
        if sampler is not None and (sampler.stochastic or sampler.grid != "uniform") and int(k) > 1:
            from fewstep.sampling.spec import sample_with

            xs, log_q = sample_with(flowmap, x1.to(dtype), sampler, int(k), cond=cond, seed=seed).x, None
            folds = 0.0
        elif teacher.dim <= kl_max_dim:
            fl = flowmap_logdensity(flowmap, x1.to(dtype), int(k), cond=cond)
            xs, log_q, folds = fl.x, fl.log_q, fl.fold_fraction
        else:
            with torch.no_grad():
                xs, log_q = sample_flowmap(flowmap, x1.to(dtype), int(k), cond=cond).x, None
            folds = 0.0
        m = evaluate_samples(xs, teacher, reference=ref, cond=cond, x_teacher=x_t, log_q=log_q, seed=seed,
                             fold_fraction=folds, density_free=teacher.dim <= kl_max_dim)
        m["nfe"] = float(k)
        results[int(k)] = m
    return results


def _solver_map(velocity_fn: Callable[..., Tensor], method: str) -> Callable[..., Tensor]:
    """One fixed step of ``method`` (euler/heun/rk4, as in :func:`fewstep.sampling.samplers.solve`) from t to s.

    Returned as a flow map f(x, t, s, cond) with per-row times.
    """

    def f(x: Tensor, t: Tensor | float, s: Tensor | float, cond: Tensor | None = None) -> Tensor:
        tt = t if torch.is_tensor(t) else torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        ss = s if torch.is_tensor(s) else torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)
        return rk_step(lambda y, tau: velocity_fn(y, tau, cond=cond), x, tt, ss, method)

    return f


def evaluate_velocity_solver(velocity_fn: Callable[..., Tensor], teacher: GaussianMixtureTeacher, method: str = "euler",
                             steps: int | Sequence[float] = 4, n: int = 2000, seed: int = 0,
                             cond: Tensor | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                             x_teacher: Tensor | None = None, reference: Tensor | None = None,
                             kl_max_dim: int = 2) -> dict[str, float]:
    """Metrics of a velocity field ``fn(x, t, cond=None)`` sampled by an ODE solver from :func:`noise`.

    Args:
        velocity_fn: The velocity field (e.g. the teacher itself, or ``flowmap.velocity``).
        teacher: The target mixture.
        method: ``euler``/``heun``/``rk4`` (fixed steps) or a torchdiffeq adaptive method (``dopri5``).
        steps: Number of uniform steps or a decreasing grid (fixed-step methods only).
        n: Number of samples.
        seed: Noise seed.
        cond: Labels (shape (n,)).
        rtol: Tolerance of an adaptive method.
        atol: Tolerance of an adaptive method.
        x_teacher: Teacher endpoints from the same noise (default: computed by an adaptive teacher solve).
        reference: Reference samples (default: exact mixture samples).
        kl_max_dim: Compute KL/TV when the dimension is at most this.

    Returns:
        The metrics of :func:`evaluate_samples` plus ``nfe`` (of the sampling solve).
    """
    x1 = noise(n, teacher, seed)
    if x_teacher is None:
        x_teacher, _ = teacher_endpoint(teacher, x1, cond)
    dtype = _model_dtype(velocity_fn)
    x1 = x1.to(dtype)
    log_q, folds = None, 0.0
    if method in ODE_METHODS:
        grid = time_grid(steps) if isinstance(steps, int) else check_grid(steps)
        with torch.no_grad():
            res = solve(velocity_fn, x1, grid, method=method, cond=cond)
        if teacher.dim <= kl_max_dim:  # each solver step is a jump; it folds when I + h dv/dx has det <= 0
            fl = flowmap_logdensity(_solver_map(velocity_fn, method), x1, grid, cond=cond)
            log_q, folds = fl.log_q, fl.fold_fraction
    else:
        with torch.no_grad():
            res = solve_adaptive(velocity_fn, x1, rtol=rtol, atol=atol, method=method, cond=cond)
        if teacher.dim <= kl_max_dim:
            lr = ode_logdensity(velocity_fn, x1, [1.0, 0.0], standard_normal_logprob(x1), method=method, rtol=rtol,
                                atol=atol, cond=cond)
            # the augmented solve adapts its own steps; evaluate at its endpoint (within tolerance of res.x)
            # so that log q belongs to the points. nfe stays that of the plain sampling solve.
            log_q, res.x = lr.log_q, lr.x
    m = evaluate_samples(res.x, teacher, reference=reference, cond=cond, x_teacher=x_teacher, log_q=log_q, seed=seed,
                         fold_fraction=folds, density_free=teacher.dim <= kl_max_dim)
    m["nfe"] = float(res.nfe)
    return m


evaluate_teacher_solver = evaluate_velocity_solver
