r"""KL and TV that stay valid when a sampler's change-of-variables density is not: fold-aware, density-free.

Three pieces (docs/methods.md §7):

* :func:`importance_weight_check` — :math:`E_q[p/q]` with its standard error from samples of q. For a true
  density q and a normalised p it equals :math:`\int_{q>0} p \le 1`; a value above 1 (beyond 2 standard errors)
  proves that the supplied :math:`\log q` is not the samples' density (for a folded map the change of variables
  misses the other preimages, so q is underestimated and the weights inflate).
* :func:`cov_kl_tv` — the importance-sampled KL/TV of :func:`fewstep.evaluation.metrics.kl_tv_importance`, refused
  with a ValueError when the map folds (:attr:`fewstep.sampling.jump_density.FlowMapLogDensity.fold_fraction`
  above ``fold_tol``, default 0: one folded row already proves the map is not injective, and the error of the
  one-preimage density is not bounded by the share of folded rows), otherwise returned with the weight check.
* Density-free estimators between samples x of q and exact samples y of p, usable in low dimension
  (2-3-D): the k-nearest-neighbour KL of Wang, Kulkarni and Verdú (2009), "Divergence estimation for
  multidimensional densities via k-nearest-neighbor distances", IEEE Trans. Inf. Theory 55(5):2392-2405, eq. (5),

  .. math::
      \widehat{KL}(q\|p) = \frac dn\sum_{i=1}^n \log\frac{\nu_k(i)}{\rho_k(i)} + \log\frac{m}{n-1},

  with :math:`\rho_k(i)` the distance from :math:`x_i` to its k-th neighbour among the other x and
  :math:`\nu_k(i)` to its k-th neighbour among the m samples y; and TV from the same k-NN density ratio,
  :math:`\widehat{TV} = \frac1n\sum_i (1 - \hat r_i)_+`, :math:`\hat r_i = \frac{n-1}{m}(\rho_k(i)/\nu_k(i))^d`
  (:math:`TV = E_q[(1 - p/q)_+]`), or from a histogram on a common grid, :math:`\tfrac12\sum_b|\hat q_b - \hat p_b|`.
  Both TV estimators are biased upward by sampling noise near TV = 0; report the value for two independent
  exact sample sets of the same sizes (the *floor*) beside them.

Standard errors of the k-NN estimators are std/√n of the per-sample terms (the terms are weakly dependent; the
Gaussian tests in tests/evaluation/test_divergences.py check the estimates against closed forms).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from fewstep.evaluation.metrics import kl_tv_importance

__all__ = [
    "FOLD_TOL",
    "importance_weight_check",
    "cov_kl_tv",
    "knn_kl",
    "knn_tv",
    "histogram_tv",
    "density_free_kl_tv",
    "valid_kl_tv",
]

#: Largest tolerated share of folded rows for a change-of-variables density (see the module docstring).
FOLD_TOL = 0.0


def _points(x: Tensor, name: str) -> np.ndarray:
    if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(
            f"{name} must be a tensor of shape (n >= 2, d); got "
            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
        )
    a = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu().numpy()
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _pair(x: Tensor, y: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _points(x, "x (samples of q)"), _points(y, "y (samples of p)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    if not 1 <= k < min(a.shape[0], b.shape[0] + 1):
        raise ValueError(f"k must satisfy 1 <= k < n and k <= m; got k={k}, n={a.shape[0]}, m={b.shape[0]}")
    return a, b


def _knn_dists(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rho_k, nu_k): k-th neighbour distances of each row of a among the other rows of a, and among b."""
    rho = cKDTree(a).query(a, k + 1)[0][:, -1]
    nu = cKDTree(b).query(a, k)[0]
    return rho, (nu if nu.ndim == 1 else nu[:, -1])


def importance_weight_check(log_q: Tensor, log_p: Tensor) -> dict[str, float]:
    r""":math:`E_q[p/q]` and its standard error from :math:`\log q, \log p` at samples of q.

    Args:
        log_q: Claimed :math:`\log q(x_i)`, shape (n,).
        log_p: Normalised :math:`\log p(x_i)`, shape (n,).

    Returns:
        Dict with ``w_mean`` (:math:`\frac1n\sum_i p(x_i)/q(x_i)`), ``w_se`` (std/√n) and ``w_ok``: 1.0 when
        ``w_mean <= 1 + 2 w_se`` (consistent with a valid density), else 0.0.

    Raises:
        ValueError: If the inputs differ in length or have fewer than 2 entries.
    """
    lq, lp = log_q.detach().to(torch.float64).flatten().cpu(), log_p.detach().to(torch.float64).flatten().cpu()
    if lq.shape != lp.shape or lq.numel() < 2:
        raise ValueError(f"log q and log p must have the same length >= 2; got {tuple(lq.shape)}, {tuple(lp.shape)}")
    w = torch.exp(lp - lq)
    mean, se = float(w.mean()), float(w.std() / math.sqrt(w.numel()))
    return {"w_mean": mean, "w_se": se, "w_ok": float(mean <= 1.0 + 2.0 * se)}


def cov_kl_tv(log_q: Tensor, log_p: Tensor, fold_fraction: float, fold_tol: float = FOLD_TOL) -> dict[str, float]:
    r"""Importance-sampled KL(q‖p), TV(q, p) from a change-of-variables :math:`\log q`, refused for folding maps.

    Args:
        log_q: Change-of-variables :math:`\log q(x_i)` at the samples, shape (n,).
        log_p: :math:`\log p(x_i)`, shape (n,).
        fold_fraction: Share of samples at which the map that made them has det <= 0 (0 for an ODE solve).
        fold_tol: Largest accepted ``fold_fraction``.

    Returns:
        The :func:`~fewstep.evaluation.metrics.kl_tv_importance` dict plus :func:`importance_weight_check`'s
        ``w_mean``, ``w_se``, ``w_ok`` and ``fold_fraction``.

    Raises:
        ValueError: If the map folds (``fold_fraction > fold_tol``): log q is then not the samples' density.
    """
    if not fold_fraction <= fold_tol:
        raise ValueError(
            f"change-of-variables KL/TV refused: the map folds (det df/dx <= 0) on "
            f"{100 * fold_fraction:.1f}% of samples (tolerance {100 * fold_tol:.1f}%), so log q is not "
            f"the samples' density; use the density-free knn_kl / knn_tv instead"
        )
    out = kl_tv_importance(log_q, log_p)
    return {**out, **importance_weight_check(log_q, log_p), "fold_fraction": float(fold_fraction)}


def knn_kl(x: Tensor, y: Tensor, k: int = 5) -> dict[str, float]:
    r"""Wang-Kulkarni-Verdú k-NN estimate of KL(q‖p) from samples x ~ q and y ~ p (module docstring).

    Args:
        x: Samples of q, shape (n, d).
        y: Samples of p, shape (m, d); m larger than n lowers the variance.
        k: Neighbour rank (5 is accurate to ~0.03 nats on 2-D Gaussians at n = 2000, m = 20000).

    Returns:
        Dict with ``kl``, ``kl_se`` (std/√n of the per-sample terms), ``n``, ``m``, ``k``. Coincident samples of
        q (a singular q) give ``kl = inf``.
    """
    a, b = _pair(x, y, k)
    n, d = a.shape
    rho, nu = _knn_dists(a, b, k)
    with np.errstate(divide="ignore"):
        terms = d * (np.log(nu) - np.log(rho))
    if not np.isfinite(terms).all():
        return {"kl": math.inf, "kl_se": math.inf, "n": float(n), "m": float(b.shape[0]), "k": float(k)}
    kl = float(terms.mean() + math.log(b.shape[0] / (n - 1)))
    return {
        "kl": kl,
        "kl_se": float(terms.std(ddof=1) / math.sqrt(n)),
        "n": float(n),
        "m": float(b.shape[0]),
        "k": float(k),
    }


def knn_tv(x: Tensor, y: Tensor, k: int = 20) -> dict[str, float]:
    r"""k-NN estimate of TV(q, p) = :math:`E_q[(1 - p/q)_+]` with the density ratio of the module docstring.

    Args:
        x: Samples of q, shape (n, d).
        y: Samples of p, shape (m, d).
        k: Neighbour rank (larger: less noise, more smoothing; 20 at n = 2000).

    Returns:
        Dict with ``tv``, ``tv_se`` (std/√n of the per-sample terms).
    """
    a, b = _pair(x, y, k)
    n, d = a.shape
    rho, nu = _knn_dists(a, b, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (n - 1) / b.shape[0] * np.exp(d * (np.log(rho) - np.log(nu)))
    terms = np.clip(1.0 - np.nan_to_num(ratio, nan=0.0), 0.0, None)
    return {"tv": float(terms.mean()), "tv_se": float(terms.std(ddof=1) / math.sqrt(n))}


def histogram_tv(x: Tensor, y: Tensor, bins: int = 16, clip: float = 1e-3) -> dict[str, float]:
    r"""Histogram estimate :math:`\tfrac12\sum_b|\hat q_b - \hat p_b|` on a common grid (low dimension).

    The grid spans the pooled samples' ``clip`` and ``1 - clip`` quantiles per axis with ``bins`` cells each;
    points outside fall into the edge cells. Binning can only lower TV (data processing), sampling noise raises it.

    Args:
        x: Samples of q, shape (n, d).
        y: Samples of p, shape (m, d).
        bins: Cells per axis (d <= 3 keeps bins**d cells manageable).
        clip: Quantile clipped at each end of each axis.

    Returns:
        Dict with ``tv`` and ``tv_se`` (delta method over both multinomials, treating the signs as fixed).

    Raises:
        ValueError: If the dimension is above 3 or bins < 2.
    """
    a, b = _pair(x, y, 1)
    d = a.shape[1]
    if d > 3 or bins < 2:
        raise ValueError(f"histogram_tv needs dimension <= 3 and bins >= 2; got d={d}, bins={bins}")
    pool = np.concatenate([a, b])
    lo, hi = np.quantile(pool, clip, axis=0), np.quantile(pool, 1 - clip, axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    edges = [np.linspace(lo[i], hi[i], bins + 1) for i in range(d)]

    def hist(z: np.ndarray) -> np.ndarray:
        return np.histogramdd(np.clip(z, lo, hi), bins=edges)[0].ravel() / z.shape[0]

    hq, hp = hist(a), hist(b)
    sgn = np.sign(hq - hp)
    var = ((sgn**2 * hq).sum() - (sgn * hq).sum() ** 2) / a.shape[0] + (
        (sgn**2 * hp).sum() - (sgn * hp).sum() ** 2
    ) / b.shape[0]
    return {"tv": float(0.5 * np.abs(hq - hp).sum()), "tv_se": float(0.5 * math.sqrt(max(var, 0.0)))}


def density_free_kl_tv(
    x: Tensor, reference: Tensor, floor: Tensor | None = None, k_kl: int = 5, k_tv: int = 20
) -> dict[str, float]:
    """:func:`knn_kl` and :func:`knn_tv` of samples x against exact target samples, with their floors.

    Args:
        x: Samples of q, shape (n, d).
        reference: Exact samples of p, shape (m, d) (m = 10 n in :mod:`fewstep.evaluation.evaluate`).
        floor: Optional independent exact samples of p, shape (n, d): the same estimators on them give the value
            of a perfect sampler at this n (``*_floor``).
        k_kl: Neighbour rank of the KL estimator.
        k_tv: Neighbour rank of the TV estimator.

    Returns:
        Dict with ``kl_knn``, ``kl_knn_se``, ``tv_knn``, ``tv_knn_se`` and, with ``floor``, ``kl_knn_floor``,
        ``tv_knn_floor``.
    """
    kl, tv = knn_kl(x, reference, k_kl), knn_tv(x, reference, k_tv)
    out = {"kl_knn": kl["kl"], "kl_knn_se": kl["kl_se"], "tv_knn": tv["tv"], "tv_knn_se": tv["tv_se"]}
    if floor is not None:
        out["kl_knn_floor"] = knn_kl(floor, reference, k_kl)["kl"]
        out["tv_knn_floor"] = knn_tv(floor, reference, k_tv)["tv"]
    return out


def valid_kl_tv(
    x: Tensor,
    log_q: Tensor | None,
    log_p: Tensor | None,
    fold_fraction: float = 0.0,
    reference: Tensor | None = None,
    floor: Tensor | None = None,
    fold_tol: float = FOLD_TOL,
    max_dim: int = 3,
) -> dict[str, float]:
    """KL/TV of samples x of q against p by the valid route, with the fold and weight checks beside them.

    With a change-of-variables ``log_q``: ``fold_fraction`` and the :func:`importance_weight_check` are always
    reported; when the map does not fold, ``kl``/``tv`` are importance-sampled (``kl_from_cov`` = 1). With
    ``reference`` samples in dimension <= ``max_dim`` the density-free ``kl_knn``/``tv_knn`` are reported too, and
    they become ``kl``/``tv`` (``kl_from_cov`` = 0) when the map folds or no ``log_q`` is given. A folding map in
    higher dimension gets no ``kl``/``tv``.

    Args:
        x: Samples of q, shape (n, ...).
        log_q: Change-of-variables log q at x, or None.
        log_p: Exact normalised log p at x (needed with ``log_q``).
        fold_fraction: Share of folded rows of the map that made x.
        reference: Exact samples of p for the density-free estimators, or None.
        floor: Independent exact samples of p of x's size (floors of the density-free estimators), or None.
        fold_tol: Largest accepted ``fold_fraction`` for the change of variables.
        max_dim: Largest dimension for the density-free estimators.

    Returns:
        Metric name -> float (see above).

    Raises:
        ValueError: If ``log_q`` is given without ``log_p``.
    """
    out: dict[str, float] = {}
    if log_q is not None:
        if log_p is None:
            raise ValueError("log_p is needed to check a change-of-variables log_q")
        out.update({"fold_fraction": float(fold_fraction), **importance_weight_check(log_q, log_p)})
        if fold_fraction <= fold_tol:
            kt = cov_kl_tv(log_q, log_p, fold_fraction, fold_tol)
            out.update({k: kt[k] for k in ("kl", "kl_se", "tv", "tv_se")})
            out["kl_from_cov"] = 1.0
    if reference is not None and x[0].numel() <= max_dim:
        out.update(
            density_free_kl_tv(
                x.reshape(x.shape[0], -1),
                reference.reshape(reference.shape[0], -1),
                None if floor is None else floor.reshape(floor.shape[0], -1),
            )
        )
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
