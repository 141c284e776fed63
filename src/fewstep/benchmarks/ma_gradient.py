r"""Gradient error of the marginal-alignment surrogate against the closed-form window-KL gradient (64-D).

Closed-form case: a Gaussian teacher :math:`p_0 = \mathcal N(m, S)` in d dimensions (so
:math:`p_t = \mathcal N((1-t)m, (1-t)^2 S + t^2 I)`) and an affine velocity student :math:`u(x) = Ax + b`, whose
window map over [t_e, t_s] is the exact affine flow :math:`x \mapsto e^{-hA}x + q`, h = t_s - t_e. The pushforward
of :math:`p_{t_s}` is Gaussian, so :math:`KL(\Phi\#p_{t_s} \| \tilde p_{t_e})` and its gradient in (A, b) are exact
(autograd through ``matrix_exp``); :math:`\tilde p_{t_e}` is the window-end target of
:mod:`fewstep.methods._shared.alignment` (the Gaussian-smoothed data marginal when t_e < ``t_min``). The MA
surrogate's gradient (:func:`~fewstep.methods._shared.alignment.ma_loss`) on n samples is compared with it:
relative error :math:`\|g - g^*\|/\|g^*\|`, mean ± std over seeds, against the exact gradient on the same samples
(:func:`sample_exact_grad`) and against the closed form. Its sources: the sample average (shared by every
row, see the ``exact`` rows), the ODE discretisation (sub-steps) and the Hutchinson probes.

Run::

    python -m fewstep.benchmarks.ma_gradient                    # the tables of docs/results/ma_gradient.md
    python -m fewstep.benchmarks.ma_gradient --seeds 2 --no-timing   # quicker
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewstep.core.utils import as_time, bcast
from fewstep.methods._shared.alignment import ma_loss
from fewstep.teachers import GaussianMixtureTeacher

__all__ = ["AffineVelocity", "gaussian_case", "closed_form_kl", "closed_form_grad", "ma_gradient",
           "sample_exact_grad", "rel_error", "main"]

DT = torch.float64


class AffineVelocity(nn.Module):
    """Velocity student :math:`u(x, t) = Ax + b`; its flow map is one Euler jump :math:`x - (t-s)u(x, t)`."""

    parameterization = "velocity"

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """:math:`u(x) = Ax + b` (time-independent)."""
        return x @ self.a.T + self.b

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        """One Euler jump :math:`f_{t\\to s}(x) = x - (t-s)u(x)`."""
        tt, ss = as_time(t, x), as_time(s, x)
        return x - bcast(tt - ss, x) * self.velocity(x, tt)

    def grad(self) -> Tensor:
        """The parameter gradient (A, b) flattened into one vector."""
        return torch.cat([self.a.grad.flatten(), self.b.grad])


def gaussian_case(d: int = 64, seed: int = 0) -> tuple[GaussianMixtureTeacher, Tensor, Tensor]:
    """A Gaussian teacher N(m, S) (eigenvalues of S in [0.05, 1]) and a student (A0, b0), all drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    lam = 0.05 + 0.95 * torch.rand(d, generator=g, dtype=DT)
    s = (q * lam) @ q.T
    m = torch.randn(d, generator=g, dtype=DT)
    a0 = 0.5 * torch.eye(d, dtype=DT) + 0.3 * torch.randn(d, d, generator=g, dtype=DT) / d**0.5
    b0 = 0.3 * torch.randn(d, generator=g, dtype=DT)
    return GaussianMixtureTeacher([1.0], m[None], 0.5 * (s + s.T)[None]), a0, b0


def _marginal(teacher: GaussianMixtureTeacher, t: float) -> tuple[Tensor, Tensor]:
    m, s = teacher.means[0], teacher.covariances[0]
    return (1 - t) * m, (1 - t) ** 2 * s + t**2 * torch.eye(m.numel(), dtype=DT)


def _target(teacher: GaussianMixtureTeacher, t_end: float, t_min: float) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of :math:`\tilde p_{t_e}(x) = c^d p_\varepsilon(cx)` (= p_{t_e} when t_e >= t_min)."""
    if t_end >= t_min:
        return _marginal(teacher, t_end)
    c = (1 - t_min) / (1 - t_end)
    m, s = _marginal(teacher, t_min)
    return m / c, s / c**2


def _kl(m0: Tensor, c0: Tensor, m1: Tensor, c1: Tensor) -> Tensor:
    """KL(N(m0, c0) || N(m1, c1))."""
    ic1 = torch.linalg.inv(c1)
    dm = m1 - m0
    return 0.5 * (torch.trace(ic1 @ c0) + dm @ ic1 @ dm - m0.numel() + torch.logdet(c1) - torch.logdet(c0))


def closed_form_kl(a: Tensor, b: Tensor, teacher: GaussianMixtureTeacher, t_start: float, t_end: float,
                   t_min: float = 0.05) -> Tensor:
    r""":math:`KL(\Phi\#p_{t_s}\|\tilde p_{t_e})` for the exact flow of :math:`\dot x = Ax + b` run from t_s to t_e."""
    d = b.numel()
    aug = torch.zeros(d + 1, d + 1, dtype=DT)
    aug[:d, :d], aug[:d, d] = a, b
    e = torch.linalg.matrix_exp(-(t_start - t_end) * aug)
    p, q = e[:d, :d], e[:d, d]
    ms, cs = _marginal(teacher, t_start)
    me, ce = _target(teacher, t_end, t_min)
    return _kl(p @ ms + q, p @ cs @ p.T, me, ce)


def closed_form_grad(teacher: GaussianMixtureTeacher, a0: Tensor, b0: Tensor, t_start: float, t_end: float,
                     t_min: float = 0.05) -> Tensor:
    """Exact gradient of :func:`closed_form_kl` in (A, b), flattened."""
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ga, gb = torch.autograd.grad(closed_form_kl(a, b, teacher, t_start, t_end, t_min), (a, b))
    return torch.cat([ga.flatten(), gb])


def ma_gradient(teacher: GaussianMixtureTeacher, a0: Tensor, b0: Tensor, t_start: float, t_end: float, n: int,
                seed: int, **kw: object) -> Tensor:
    """Gradient of the MA surrogate (``ma_loss(**kw)``) on n samples of p_{t_s} drawn with ``seed``."""
    student = AffineVelocity(a0, b0)
    gen = torch.Generator().manual_seed(seed)
    x = teacher.sample(n, t_start, generator=gen, dtype=DT)
    ma_loss(student, teacher, x, t_start, t_end, generator=gen, compute_kl=False, **kw).loss.backward()
    return student.grad()


def sample_exact_grad(teacher: GaussianMixtureTeacher, a0: Tensor, b0: Tensor, t_start: float, t_end: float, n: int,
                      seed: int, t_min: float = 0.05) -> Tensor:
    r"""The exact gradient on the samples of :func:`ma_gradient` (same seed): exact flow, exact divergence.

    :math:`\nabla E_n[\Delta - \log\tilde p_{t_e}(Px + q)]` with :math:`(P, q)` from ``matrix_exp`` and
    :math:`\Delta = -\log\det P = h\,\mathrm{tr}A`; every estimator's error against it is its own (sub-steps,
    probes), not the sample average's.
    """
    x = teacher.sample(n, t_start, generator=torch.Generator().manual_seed(seed), dtype=DT)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    d = b.numel()
    aug = torch.zeros(d + 1, d + 1, dtype=DT)
    aug[:d, :d], aug[:d, d] = a, b
    e = torch.linalg.matrix_exp(-(t_start - t_end) * aug)
    me, ce = _target(teacher, t_end, t_min)
    lp = torch.distributions.MultivariateNormal(me, ce).log_prob(x @ e[:d, :d].T + e[:d, d])
    ga, gb = torch.autograd.grad((t_start - t_end) * torch.trace(a) - lp.mean(), (a, b))
    return torch.cat([ga.flatten(), gb])


def rel_error(g: Tensor, ref: Tensor) -> float:
    r""":math:`\|g - g^*\| / \|g^*\|`."""
    return float((g - ref).norm() / ref.norm())


def _pm(errs: list[float]) -> str:
    e = torch.tensor(errs)
    return f"{100 * float(e.mean()):.1f} ± {100 * (float(e.std()) if len(errs) > 1 else 0.0):.1f}"


def _mlp_step_seconds(d: int, n: int, reps: int, **kw: object) -> float:
    """Wall time of one MA loss + backward for an MLP velocity student (hidden 256, depth 4) on n rows."""
    from fewstep.core.flowmap import FlowMap
    from fewstep.networks.mlp import MLP

    teacher, _, _ = gaussian_case(d, 0)
    torch.manual_seed(0)
    student = FlowMap(MLP(d, 256, 4, use_s=False), "velocity")
    x = teacher.sample(n, 1.0, generator=torch.Generator().manual_seed(0)).float()
    tic = time.perf_counter()
    for _ in range(reps):
        ma_loss(student, teacher, x, 1.0, 0.0, compute_kl=False, **kw).loss.backward()
    return (time.perf_counter() - tic) / reps


def configs(substeps: Sequence[int], probes: Sequence[int]) -> list[tuple[str, dict[str, object]]]:
    """(label, ma_loss options) of the table rows: the old 64-D setting, exact divergence, Hutchinson M x K."""
    rows: list[tuple[str, dict[str, object]]] = [
        ("hutchinson, euler, M=1, K=1 (previous 64-D setting)",
         {"mode": "hutchinson", "solver": "euler", "substeps": 1, "num_probes": 1})]
    rows += [(f"exact, rk4, M={m}", {"mode": "exact", "solver": "rk4", "substeps": m}) for m in substeps[:2]]
    rows += [(f"hutchinson, rk4, M={m}, K={k}", {"mode": "hutchinson", "solver": "rk4", "substeps": m,
                                                "num_probes": k}) for m in substeps for k in probes]
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Print the markdown table: sub-steps x probes vs relative gradient error and seconds per MA step."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n", type=int, nargs="+", default=[128, 1024], help="samples per gradient (one table each)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--substeps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--window", type=float, nargs=2, default=[1.0, 0.0], help="t_start t_end")
    p.add_argument("--t-min", type=float, default=0.05)
    p.add_argument("--time-batch", type=int, default=128, help="rows of the MLP timing (ma_batch)")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    ts, te = args.window
    teacher, a0, b0 = gaussian_case(args.dim, 0)
    ref = closed_form_grad(teacher, a0, b0, ts, te, args.t_min)
    rows = configs(args.substeps, args.probes)
    secs = {label: (float("nan") if args.no_timing else
                    _mlp_step_seconds(args.dim, args.time_batch, 1 if kw["mode"] == "exact" else 3,
                                      t_min=args.t_min, **kw)) for label, kw in rows}
    for n in args.n:
        exact = [sample_exact_grad(teacher, a0, b0, ts, te, n, s, args.t_min) for s in seeds]
        print(f"\n# d={args.dim}, window [{te}, {ts}], t_min={args.t_min}, n={n} samples, seeds 0-{args.seeds - 1}: "
              f"relative error ||g - g*||/||g*|| in %, mean ± std over seeds; ms: one MA loss + backward, "
              f"MLP 256x4 velocity student, {args.time_batch} rows, float32, 1 thread")
        print("| estimator | vs exact, same samples | vs closed form | ms / MA step |")
        print("|---|---|---|---|")
        print(f"| exact gradient of the sample (exact flow and divergence) | 0 | "
              f"{_pm([rel_error(g, ref) for g in exact])} | |")
        for label, kw in rows:
            gs = [ma_gradient(teacher, a0, b0, ts, te, n, s, t_min=args.t_min, **kw) for s in seeds]
            print(f"| {label} | {_pm([rel_error(g, e) for g, e in zip(gs, exact)])} | "
                  f"{_pm([rel_error(g, ref) for g in gs])} | {1000 * secs[label]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
