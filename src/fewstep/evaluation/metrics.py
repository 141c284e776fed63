r"""Metrics on sample sets; every function returns a float or a dict of floats.

* :func:`mmd2` — unbiased RBF MMD² summed over bandwidths (our default metric, docs/methods.md §7).
* :func:`mean_loglik` — mean exact :math:`\log p_0` of samples under a Gaussian-mixture teacher.
* :func:`mode_coverage` — share of mixture modes hit, per-mode shares, off-mode fraction.
* :func:`coupling_error` — distance to the teacher's ODE endpoint from the same noise.
* :func:`w2` (exact optimal transport) and :func:`sliced_w2`.
* :func:`kl_tv_importance` — KL(q‖p) and TV(q, p) from samples of q with known log q and log p.
* :func:`straightness` — :math:`S(Z) = \int_0^1 E\|(Z_0 - Z_1) - \dot Z_t\|^2 dt` from a discrete trajectory.
* :func:`frechet_distance` — Fréchet distance between Gaussian fits of two feature sets (the digit-feature
  version is in :mod:`fewstep.evaluation.digit_features`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fewstep.core.utils import per_sample_sq_norm
from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = [
    "mmd2", "mean_loglik", "mode_coverage", "component_stats", "coupling_error", "w2", "sliced_w2",
    "kl_tv_importance", "straightness", "frechet_distance",
]


def _flat64(x: Tensor, name: str = "x") -> Tensor:
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a tensor of shape (n >= 2, ...); got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    return x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _flat64(x, "x"), _flat64(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same event size; got {a.shape[1]} and {b.shape[1]}")
    return a, b


def _kernel_sum(a: Tensor, b: Tensor, inv2h2: Tensor, chunk: int) -> Tensor:
    """Sum over all pairs of sum_h exp(-|a_i - b_j|^2 / (2 h^2)), one value per bandwidth."""
    total = torch.zeros_like(inv2h2)
    bn = (b**2).sum(1)
    for i in range(0, a.shape[0], chunk):
        ai = a[i:i + chunk]
        d2 = ((ai**2).sum(1)[:, None] + bn[None, :] - 2 * ai @ b.T).clamp_min(0)
        for k in range(inv2h2.numel()):
            total[k] += torch.exp(-d2 * inv2h2[k]).sum()
    return total


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.05, 0.2, 1.0), scale: str | float = "auto",
         chunk: int = 1024) -> float:
    r"""Unbiased MMD² with the summed RBF kernel :math:`k(x,y) = \sum_h \exp(-\|x-y\|^2 / (2 h^2))`.

    .. math::
        \widehat{MMD}^2 = \frac{1}{n(n-1)}\sum_{i\ne j}k(x_i,x_j) + \frac{1}{m(m-1)}\sum_{i\ne j}k(y_i,y_j)
        - \frac{2}{nm}\sum_{i,j}k(x_i,y_j).

    Convention (docs/methods.md §7): bandwidths {0.05, 0.2, 1.0} summed, 2000 vs 2000 samples; on ring8 the exact
    teacher gives ≈3.0 (1 Euler step), ≈0.018 (4 steps), ≈9e-4 (adaptive); two independent true sets give
    ≈3e-4 ± 8e-4. The estimate is unbiased, so it can be slightly negative.

    Args:
        x: Samples, shape (n, ...).
        y: Samples, shape (m, ...).
        bandwidths: Kernel bandwidths h.
        scale: ``"auto"`` multiplies every bandwidth by :math:`\sqrt{d/2}` (d = event size), so 2-D is unchanged
            and the typical distance scale :math:`\propto\sqrt d` is followed in high dimension; ``"none"``
            uses the bandwidths as given; a number multiplies them by that number.
        chunk: Rows per block; memory is O(chunk · max(n, m)), so 10k × 10k fits easily.

    Returns:
        The unbiased MMD² estimate.
    """
    a, b = _pair(x, y)
    d = a.shape[1]
    if scale == "auto":
        mult = math.sqrt(d / 2.0)
    elif scale == "none":
        mult = 1.0
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        mult = float(scale)
    else:
        raise ValueError(f"scale must be 'auto', 'none' or a positive number; got {scale!r}")
    h = torch.as_tensor(list(bandwidths), dtype=torch.float64) * mult
    if h.numel() == 0 or bool((h <= 0).any()):
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers; got {list(bandwidths)}")
    inv = 1.0 / (2 * h**2)
    n, m = a.shape[0], b.shape[0]
    kxx = (_kernel_sum(a, a, inv, chunk).sum() - n * h.numel()) / (n * (n - 1))
    kyy = (_kernel_sum(b, b, inv, chunk).sum() - m * h.numel()) / (m * (m - 1))
    kxy = _kernel_sum(a, b, inv, chunk).sum() / (n * m)
    return float(kxx + kyy - 2 * kxy)


def mean_loglik(x: Tensor, teacher: GaussianMixtureTeacher, cond: Tensor | None = None) -> float:
    r"""Mean exact :math:`\frac1n\sum_i \log p_0(x_i\,|\,c_i)` under the teacher's mixture (higher is better)."""
    with torch.no_grad():
        return float(teacher.log_prob(x.to(torch.float64), 0.0, cond).mean())


def component_stats(x: Tensor, teacher: GaussianMixtureTeacher, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Most responsible component :math:`\arg\max_k w_k N(x; \mu_k, \Sigma_k)` and the squared Mahalanobis
    distances :math:`(x-\mu_k)^\top\Sigma_k^{-1}(x-\mu_k)` to every component, shapes (n,) and (n, K).
    Rows with a label c >= 0 are assigned among the components of class c only."""
    a = _flat64(x)
    if a.shape[1] != teacher.dim:
        raise ValueError(f"samples have {a.shape[1]} dimensions but the teacher has {teacher.dim}")
    mu, lam, vec = (teacher.means.cpu(), teacher.eigvals.cpu(), teacher.eigvecs.cpu())
    y = torch.einsum("kji,nkj->nki", vec, a[:, None, :] - mu[None])
    maha2 = (y**2 / lam[None]).sum(-1)
    logits = torch.log(teacher.weights.cpu())[None] - 0.5 * (maha2 + torch.log(lam).sum(-1)[None])
    if cond is not None:
        c = cond.cpu()
        keep = (teacher.classes.cpu()[None, :] == c[:, None]) | (c[:, None] < 0)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.argmax(1), maha2


def mode_coverage(x: Tensor, teacher: GaussianMixtureTeacher, threshold_std: float = 3.0, min_share: float = 0.1,
                  cond: Tensor | None = None) -> dict[str, float | list[float]]:
    r"""Mode coverage of samples from a Gaussian-mixture target.

    Each sample is assigned to its most responsible component. It is *off-mode* when, for every component,
    its squared Mahalanobis distance exceeds the :math:`\chi^2_d` quantile matching ``threshold_std`` in 1-D,
    i.e. :math:`P(\chi^2_d > q) = P(|N(0,1)| > \text{threshold\_std})` (0.27% for 3 std), so exact samples are
    off-mode at that rate in any dimension (in 1-D this is exactly distance > threshold_std).

    Args:
        x: Samples, shape (n, *event_shape).
        teacher: The target mixture.
        threshold_std: Off-mode threshold, in 1-D standard deviations.
        min_share: A component counts as covered when its on-mode share is at least this fraction of its
            expected share.
        cond: Labels of the samples (shape (n,), -1 for unconditional rows); expected shares then follow the
            labels.

    Returns:
        Dict with ``modes_covered`` (fraction of components whose on-mode share of the samples is at least
        ``min_share`` × their expected share), ``per_mode`` (on-mode share of each component), ``expected``
        (each component's expected share) and ``off_mode`` (fraction of off-mode samples).
    """
    from scipy.stats import chi2, norm

    if threshold_std <= 0 or not 0 <= min_share <= 1:
        raise ValueError(f"need threshold_std > 0 and 0 <= min_share <= 1; got {threshold_std}, {min_share}")
    comp, maha2 = component_stats(x, teacher, cond)
    n, k = maha2.shape
    q = float(chi2.ppf(1.0 - 2.0 * norm.sf(threshold_std), df=teacher.dim))
    off = maha2.min(1).values > q
    counts = torch.bincount(comp[~off], minlength=k).to(torch.float64)
    share = counts / n
    w = teacher.weights.cpu()
    if cond is None:
        expected = w.clone()
    else:
        c = cond.cpu()
        cls = teacher.classes.cpu()
        cw = teacher.class_weights.cpu()
        wk = torch.where(c[:, None] < 0, w[None].expand(n, -1),
                         w[None] * (cls[None] == c[:, None]) / cw[c.clamp(min=0)][:, None])
        expected = wk.mean(0)
    covered = (share >= min_share * expected) & (expected > 0)
    return {"modes_covered": float(covered.sum() / (expected > 0).sum()), "per_mode": share.tolist(),
            "expected": expected.tolist(), "off_mode": float(off.to(torch.float64).mean())}


def coupling_error(x_student: Tensor, x_teacher: Tensor) -> dict[str, float]:
    r"""Mean :math:`\|x_s - x_T\|` and mean :math:`\|x_s - x_T\|^2` between paired rows (same noise)."""
    a, b = _pair(x_student, x_teacher)
    if a.shape != b.shape:
        raise ValueError(f"coupling_error needs paired samples of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    d2 = per_sample_sq_norm(a - b)
    return {"mean_l2": float(d2.sqrt().mean()), "mse": float(d2.mean())}


def w2(x: Tensor, y: Tensor, num_iter_max: int = 1_000_000) -> float:
    r"""Exact :math:`W_2 = (\min_\pi \sum_{ij}\pi_{ij}\|x_i - y_j\|^2)^{1/2}` between uniform empirical measures
    (POT's network simplex ``ot.emd2``). O(n³) time: keep n ≲ 5000."""
    import ot

    a, b = _pair(x, y)
    cost = ot.dist(a.numpy(), b.numpy(), metric="sqeuclidean")
    wa = torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=torch.float64).numpy()
    wb = torch.full((b.shape[0],), 1.0 / b.shape[0], dtype=torch.float64).numpy()
    return math.sqrt(max(float(ot.emd2(wa, wb, cost, numItermax=num_iter_max)), 0.0))


def sliced_w2(x: Tensor, y: Tensor, n_proj: int = 256, generator: torch.Generator | None = None,
              n_quantiles: int | None = None) -> float:
    r"""Sliced :math:`SW_2 = (E_\theta W_2^2(\theta^\top x, \theta^\top y))^{1/2}`, θ uniform on the sphere,
    with ``n_proj`` directions; 1-D W2 by matching sorted samples (equal sizes) or quantiles (otherwise)."""
    if n_proj < 1:
        raise ValueError(f"n_proj must be >= 1, got {n_proj}")
    a, b = _pair(x, y)
    theta = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    if pa.shape[0] != pb.shape[0] or n_quantiles is not None:
        qs = torch.linspace(0, 1, n_quantiles or max(pa.shape[0], pb.shape[0]), dtype=torch.float64)
        pa, pb = torch.quantile(pa, qs, dim=0), torch.quantile(pb, qs, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def kl_tv_importance(log_q_samples: Tensor, log_p_samples: Tensor) -> dict[str, float]:
    r"""KL(q‖p) and TV(q, p) from samples :math:`x_i \sim q` with known :math:`\log q(x_i)`, :math:`\log p(x_i)`.

    * :math:`KL = E_q[\log q - \log p]`, standard error std/√n.
    * :math:`TV = E_q[(1 - p/q)_+]` (``tv``), equal to :math:`\tfrac12 E_q|1 - p/q|` whenever p ≪ q and still
      correct when q is singular or misses part of p's support; :math:`\tfrac12 E_q|1-p/q|` is ``tv_abs``.

    Args:
        log_q_samples: :math:`\log q(x_i)` at the samples, shape (n,).
        log_p_samples: :math:`\log p(x_i)` at the same samples, shape (n,).

    Returns:
        Dict with kl, kl_se, tv, tv_se, tv_abs, tv_abs_se, n. Infinite log q (a singular q) gives kl = inf.
    """
    lq, lp = log_q_samples.detach().to(torch.float64).flatten(), log_p_samples.detach().to(torch.float64).flatten()
    if lq.shape != lp.shape or lq.numel() < 2:
        raise ValueError(f"log q and log p must have the same length >= 2; got {tuple(lq.shape)}, {tuple(lp.shape)}")
    n = lq.numel()
    lr = lq - lp
    ratio = torch.exp(-lr)  # p / q
    tv_pos, tv_abs = (1 - ratio).clamp_min(0), 0.5 * (1 - ratio).abs()

    def se(v: Tensor) -> float:
        return float(v.std() / math.sqrt(n)) if bool(torch.isfinite(v).all()) else float("inf")

    return {"kl": float(lr.mean()), "kl_se": se(lr), "tv": float(tv_pos.mean()), "tv_se": se(tv_pos),
            "tv_abs": float(tv_abs.mean()), "tv_abs_se": se(tv_abs), "n": float(n)}


def straightness(trajectory: Sequence[Tensor] | Tensor, times: Sequence[float] | Tensor) -> float:
    r"""Straightness :math:`S = \frac{1}{|T|}\int E\|\frac{x_{end}-x_{start}}{t_{end}-t_{start}} - \dot x_t\|^2 dt`.

    With states :math:`x_0..x_N` at times :math:`t_0..t_N` the velocity on step i is the finite difference
    :math:`\dot x_i = (x_{i+1}-x_i)/(t_{i+1}-t_i)` (exact for the piecewise-linear path an explicit solver
    produces), and the integral is the step-length-weighted mean
    :math:`S = \sum_i \frac{|t_{i+1}-t_i|}{|t_N-t_0|}\,\frac1B\sum_b\|\bar v_b - \dot x_{i,b}\|^2`.
    On the unit interval this is Liu et al.'s :math:`S(Z)=\int_0^1E\|(Z_1-Z_0)-\dot Z_t\|^2dt`. Zero iff every
    path is a straight line traversed at constant speed.
    """
    xs = torch.stack(list(trajectory)) if not torch.is_tensor(trajectory) else trajectory
    xs = xs.detach().to(torch.float64).cpu()
    ts = torch.as_tensor(times, dtype=torch.float64).flatten()
    if xs.dim() < 2 or xs.shape[0] != ts.numel() or ts.numel() < 2:
        raise ValueError(f"need N+1 >= 2 states matching N+1 times; got {xs.shape[0]} states, {ts.numel()} times")
    dt = ts[1:] - ts[:-1]
    if bool((dt == 0).any()):
        raise ValueError("times must be strictly monotone")
    xs = xs.reshape(xs.shape[0], xs.shape[1], -1)
    vbar = (xs[-1] - xs[0]) / (ts[-1] - ts[0])
    vi = (xs[1:] - xs[:-1]) / dt[:, None, None]
    per_step = per_sample_sq_norm(vi - vbar[None], batch_dims=2).mean(-1)
    return float((per_step * dt.abs()).sum() / (ts[-1] - ts[0]).abs())


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    r"""Fréchet distance :math:`\|\mu_1-\mu_2\|^2 + \mathrm{tr}(C_1 + C_2 - 2(C_1C_2)^{1/2})` of Gaussian fits.

    The trace of :math:`(C_1C_2)^{1/2}` is computed as :math:`\sum_i \sqrt{\lambda_i}` of the symmetric PSD matrix
    :math:`C_1^{1/2}C_2C_1^{1/2}` (same eigenvalues), by ``eigh`` — stable when features have zero variance,
    where ``scipy.linalg.sqrtm(C1 @ C2)`` warns about a singular matrix.
    """
    a, b = _pair(f1, f2)
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = torch.cov(a.T), torch.cov(b.T)
    lam1, u1 = torch.linalg.eigh(c1)
    s1 = (u1 * lam1.clamp_min(0).sqrt()) @ u1.T
    tr_root = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * tr_root)
