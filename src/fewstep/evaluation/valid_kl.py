r"""KL(q‖p) and TV(q, p) of a sampler by the valid route, with the fold and density checks beside them.

:func:`valid_kl_tv` is what :mod:`fewstep.evaluation.evaluate` and :mod:`fewstep.evaluation.diagnose` report
(docs/methods.md §7):

* with a change-of-variables :math:`\log q` (a chain of jumps, or an ODE solve): ``fold_fraction`` (share of
  samples at which some jump has det ∂f/∂x <= 0) and the density check ``w_mean`` ± ``w_se`` =
  :math:`E_q[p/q]` (<= 1 for a valid density, :func:`~fewstep.evaluation.divergences.importance_weight_check`)
  are always reported; when no sample is folded, ``kl``/``tv`` are importance-sampled (``kl_from_cov`` = 1);
* in dimension <= 3 the density-free ``kl_knn``/``tv_knn`` (k-NN entropy with the exact log p, or sample-only k-NN
  against target samples, :mod:`fewstep.evaluation.divergences`) are reported too, with their values for exact
  samples (``*_floor``), and become ``kl``/``tv`` (``kl_from_cov`` = 0) when the map folds or no log q exists;
* a folding map in higher dimension gets no ``kl``/``tv``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fewstep.evaluation.divergences import FOLD_TOL, cov_kl_tv, importance_weight_check, knn_kl, knn_kl_exact, knn_tv

__all__ = ["density_free_kl_tv", "valid_kl_tv"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def density_free_kl_tv(
    x: Tensor,
    log_p_fn: Callable[[Tensor], Tensor] | None = None,
    reference: Tensor | None = None,
    floor: Tensor | None = None,
    k_kl: int = 5,
    k_tv: int = 20,
) -> dict[str, float]:
    """k-NN KL and TV of samples x of q against p, from the exact log p when given, else from target samples.

    Args:
        x: Samples of q, shape (n, ...).
        log_p_fn: Exact normalised target log-density ``log_p_fn(z) -> (n,)`` (analytic teachers), or None.
        reference: Exact samples of p, shape (m, ...), used when ``log_p_fn`` is None.
        floor: Optional independent exact samples of p of x's size: the same estimators on them give the value of
            a perfect sampler at this n (``kl_knn_floor``, ``tv_knn_floor``).
        k_kl: Neighbour rank of the KL estimator.
        k_tv: Neighbour rank of the TV estimator.

    Returns:
        Dict with ``kl_knn``, ``kl_knn_se``, ``tv_knn``, ``tv_knn_se`` and, with ``floor``, the two floors.

    Raises:
        ValueError: If neither ``log_p_fn`` nor ``reference`` is given.
    """
    if log_p_fn is None and reference is None:
        raise ValueError("density-free KL/TV need the exact target log_p_fn or target reference samples")

    def both(z: Tensor) -> tuple[dict[str, float], dict[str, float]]:
        if log_p_fn is not None:
            lp = log_p_fn(z)
            return knn_kl_exact(_flat(z), lp, k_kl), knn_tv(_flat(z), k=k_tv, log_p=lp)
        assert reference is not None
        return knn_kl(_flat(z), _flat(reference), k_kl), knn_tv(_flat(z), _flat(reference), k_tv)

    kl, tv = both(x)
    out = {"kl_knn": kl["kl"], "kl_knn_se": kl["kl_se"], "tv_knn": tv["tv"], "tv_knn_se": tv["tv_se"]}
    if floor is not None:
        fk, ft = both(floor)
        out["kl_knn_floor"], out["tv_knn_floor"] = fk["kl"], ft["tv"]
    return out


def valid_kl_tv(
    x: Tensor,
    log_q: Tensor | None = None,
    log_p_fn: Callable[[Tensor], Tensor] | None = None,
    fold_fraction: float = 0.0,
    reference: Tensor | None = None,
    floor: Tensor | None = None,
    fold_tol: float = FOLD_TOL,
    max_dim: int = 3,
) -> dict[str, float]:
    """KL/TV of samples x of q by the valid route (module docstring).

    Args:
        x: Samples of q, shape (n, ...).
        log_q: Change-of-variables log q at x, or None.
        log_p_fn: Exact normalised target log-density ``log_p_fn(z) -> (n,)``, or None (needed with ``log_q``).
        fold_fraction: Share of folded rows of the map that made x (0 for an ODE solve).
        reference: Exact samples of p for the sample-only estimators (used without ``log_p_fn``), or None.
        floor: Independent exact samples of p of x's size (floors of the density-free estimators), or None.
        fold_tol: Largest accepted ``fold_fraction`` for the change of variables.
        max_dim: Largest dimension for the density-free estimators.

    Returns:
        Metric name -> float: ``fold_fraction``, ``w_mean``, ``w_se``, ``w_ok`` (with ``log_q``); ``kl_knn``,
        ``kl_knn_se``, ``tv_knn``, ``tv_knn_se`` (and floors) in low dimension; ``kl``, ``kl_se``, ``tv``,
        ``tv_se``, ``kl_from_cov`` when a valid estimate exists.

    Raises:
        ValueError: If ``log_q`` is given without ``log_p_fn``.
    """
    out: dict[str, float] = {}
    if log_q is not None:
        if log_p_fn is None:
            raise ValueError("log_p_fn (the exact target log-density) is needed to check a change-of-variables log_q")
        log_p = log_p_fn(x)
        out.update({"fold_fraction": float(fold_fraction), **importance_weight_check(log_q, log_p)})
        if fold_fraction <= fold_tol:
            kt = cov_kl_tv(log_q, log_p, fold_fraction, fold_tol)
            out.update({k: kt[k] for k in ("kl", "kl_se", "tv", "tv_se")})
            out["kl_from_cov"] = 1.0
    if (log_p_fn is not None or reference is not None) and x[0].numel() <= max_dim:
        out.update(density_free_kl_tv(x, log_p_fn, reference, floor))
        if "kl" not in out:
            out.update(
                {
                    "kl": out["kl_knn"],
                    "kl_se": out["kl_knn_se"],
                    "tv": out["tv_knn"],
                    "tv_se": out["tv_knn_se"],
                    "kl_from_cov": 0.0,
                }
            )
    return out
