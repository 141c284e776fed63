"""Shared helpers of the core tests: an MMD² fallback and analytic mixture moments."""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.teachers.gmm import GaussianMixtureTeacher


def _mmd2_local(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.05, 0.2, 1.0)) -> float:
    r"""Unbiased RBF MMD² summed over bandwidths h: k(a,b) = exp(-|a-b|²/(2h²)) (docs/methods.md §7)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    dxx, dyy, dxy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    n, m = x.shape[0], y.shape[0]
    total = 0.0
    for h in bandwidths:
        kxx, kyy, kxy = (torch.exp(-d / (2 * h * h)) for d in (dxx, dyy, dxy))
        total += float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                       + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
    return total


def mmd2(x: Tensor, y: Tensor) -> float:
    """The library's ``fewstep.evaluation.metrics.mmd2`` when it exists, else the local definition above."""
    try:
        from fewstep.evaluation.metrics import mmd2 as lib_mmd2
    except ImportError:
        return _mmd2_local(x, y)
    return float(lib_mmd2(x, y, bandwidths=(0.05, 0.2, 1.0)))


def mixture_moments(teacher: GaussianMixtureTeacher, t: float, cond: int | None = None) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of p_t(.|c): :math:`m = \alpha\bar\mu`,
    :math:`C = \alpha^2(\sum_k w_k(\Sigma_k + \mu_k\mu_k^T) - \bar\mu\bar\mu^T) + \sigma^2 I`."""
    w = teacher.weights.clone()
    if cond is not None:
        w = torch.where(teacher.classes == cond, w, torch.zeros_like(w))
        w = w / w.sum()
    a, s, _, _ = teacher.path.coefficients(torch.tensor([t], dtype=torch.float64))
    mu = (w[:, None] * teacher.means).sum(0)
    second = (w[:, None, None] * (teacher.covariances + teacher.means[:, :, None] * teacher.means[:, None, :])).sum(0)
    cov = a**2 * (second - mu[:, None] * mu[None, :]) + s**2 * torch.eye(teacher.dim, dtype=torch.float64)
    return a * mu, cov


def assert_moments(x: Tensor, mean: Tensor, cov: Tensor, z: float = 5.0) -> None:
    """Assert sample mean / covariance match (mean, cov) within ``z`` Monte-Carlo standard errors."""
    x = x.reshape(x.shape[0], -1).double()
    n = x.shape[0]
    xm = x.mean(0)
    d = x - mean
    se_mean = d.std(0) / n**0.5
    assert bool(((xm - mean).abs() <= z * se_mean + 1e-12).all()), (xm, mean, se_mean)
    prods = d[:, :, None] * d[:, None, :]
    se_cov = prods.std(0) / n**0.5
    emp = prods.mean(0)
    assert bool(((emp - cov).abs() <= z * se_cov + 1e-12).all()), (emp, cov, se_cov)
