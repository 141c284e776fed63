r"""Inductive Moment Matching (IMM; Zhou, Ermon, Song, ICML 2025) on the linear path.

The student is our ``average_velocity`` flow map :math:`f_{t\to s}(x) = x - (t-s)F_\theta(x,t,s)` (IMM's Euler-FM
parameterization with :math:`\sigma_d` folded into F, so :math:`c_{out}(s,t) = -(t-s)`). The batch is split into
B/M groups of M particles; a group shares (s, r, t), drawn as t ~ U[t_min, 1], s ~ U[0, t] (with optional point
masses: t = 1 on a fraction ``t_one_fraction`` and s = 0 on a fraction ``s_zero_fraction`` of the groups, so that
the (t, s) = (1, 0) corner that the 1-step sampler queries is trained), and r by a constant
decrement either in :math:`\eta = t/(1-t)` (``r_schedule="eta"``; IMM: :math:`\eta_r = \eta_t - (\eta_{max} -
\eta_{min})/2^k`, with :math:`\eta_t` evaluated at :math:`\min(t, t_{\eta})` so that t = 1 is allowed) or in t
(``r_schedule="t"``: :math:`r = t - 2^{-k}`), or, our own variant, relative to the jump
(``r_schedule="relative"``: :math:`r = t - (t-s)2^{-k}`, a shortcut-like geometric induction), then
:math:`r \leftarrow \max(r, s)`.

Each particle uses its own pair (x0, x1): :math:`x_t = (1-t)x_0 + t x_1` and the DDIM interpolant
:math:`x_r = (1-r)\,x_0 + \tfrac{r}{t}(x_t - (1-t)x_0) = (1-r)x_0 + r x_1`; with ``interpolant="batch"`` the
DDIM step takes the batch's posterior mean :math:`\hat x_0(x_t)` instead of the particle's own x0, i.e.
:math:`x_r = x_t - (t-r)\,\hat v(x_t,t)` with
:func:`fewstep.methods._shared.batch_velocity.batch_velocity` (no teacher); groups with t < ``batch_t_min``
keep the conditional interpolant (docs/results/method_studies.md, section 2).
With :math:`y_t^i = f^\theta_{t\to s}(x_t^i)` and the stop-gradient :math:`y_r^i = f^{\theta^-}_{r\to s}(x_r^i)`
(θ⁻ an EMA copy, or sg(θ) when ``target_ema = 0``), the loss is

.. math::
    L = E_{s,r,t}\Big[w(s,t)\,\frac{1}{|P|}\sum_{(i,j)\in P}
        k(y_t^i,y_t^j) + k(y_r^i,y_r^j) - k(y_t^i,y_r^j) - k(y_t^j,y_r^i)\Big],\qquad
    k(x,y) = \exp\Big(-\frac{\max(\|x-y\|,\epsilon)}{D\,|c_{out}(s,t)|\,\kappa}\Big),

P = all M² pairs (``estimator="v"``, the V-statistic; our reading of IMM, which with M = 1 is a consistency loss
as IMM states) or the M(M-1) pairs i ≠ j (``estimator="u"``, unbiased: zero in expectation at the exact flow
map; the V-statistic's i = j terms pair x_t and x_r of the same (x0, x1), a CT-like term that is not zero there).
D is the data dimension and κ (``kernel_scale``) an optional bandwidth factor. Weights: ``uniform`` (w = 1) or ``imm``:
:math:`w = \tfrac12\,\mathrm{sigmoid}(b - \lambda_t)\,(-\dot\lambda_t)\,\alpha_t^a/(\alpha_t^2+\sigma_t^2)` with
:math:`\lambda_t = 2\log((1-t)/t)`, :math:`-\dot\lambda_t = 2/(t(1-t))`, a = 1, b = ``weight_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.ema import ema_update_
from fewstep.core.flowmap import FlowMap
from fewstep.core.paths import LinearPath
from fewstep.core.utils import bcast
from fewstep.methods._shared.batch_velocity import batch_velocity
from fewstep.methods.base import U_AUX, U_S, U_SELECT, U_T, Batch, Method, MethodConfig
from fewstep.methods.registry import register

__all__ = ["IMMConfig", "IMM", "laplace_mmd2", "imm_r", "imm_weight"]


@dataclass
class IMMConfig(MethodConfig):
    """Hyper-parameters of IMM.

    Attributes:
        group_size: Particles per group M (IMM: 4 best; 1 and 2 collapse on images).
        r_schedule: ``eta`` (constant decrement in t/(1-t)), ``t`` (constant decrement in t) or ``relative``
            (gap (t - s) 2^-k; not in the paper).
        k: Decrement exponent: the gap is (eta_max - eta_min)/2^k (``eta``), 2^-k (``t``) or (t-s) 2^-k.
        t_eta_max: Time at which eta_max is taken (and above which eta_t is capped) for ``eta``.
        t_min: Smallest t.
        kernel_scale: Bandwidth factor κ of the Laplace kernel.
        kernel_eps: The ε of max(||x - y||, ε).
        estimator: ``v`` (all pairs, IMM) or ``u`` (pairs i != j, unbiased).
        weighting: ``uniform`` or ``imm``.
        weight_b: The b of the ``imm`` weighting.
        target_ema: EMA decay of θ⁻ (0: θ⁻ = sg(θ)).
        t_one_fraction: Fraction of groups with t = 1 exactly (the 1-step jump starts there).
        s_zero_fraction: Fraction of groups with s = 0 exactly (jumps that end at the data).
        interpolant: ``conditional`` (x_r from the particle's own (x0, x1)) or ``batch`` (DDIM step with the
            batch's posterior mean of x0).
        batch_t_min: With ``interpolant="batch"``, groups with t < batch_t_min keep the conditional interpolant
            (0: the batch interpolant everywhere).
    """

    group_size: int = 4
    r_schedule: str = "t"
    k: int = 4
    t_eta_max: float = 0.994
    t_min: float = 0.0
    kernel_scale: float = 1.0
    kernel_eps: float = 1e-8
    estimator: str = "v"
    weighting: str = "uniform"
    weight_b: float = 2.0
    target_ema: float = 0.0
    t_one_fraction: float = 0.0
    s_zero_fraction: float = 0.0
    interpolant: str = "conditional"
    batch_t_min: float = 0.0

    def __post_init__(self) -> None:
        if self.interpolant not in ("conditional", "batch"):
            raise ValueError(f"unknown interpolant {self.interpolant!r}; expected 'conditional' or 'batch'")
        if not 0.0 <= self.batch_t_min <= 1.0:
            raise ValueError(f"batch_t_min must lie in [0, 1]; got {self.batch_t_min}")
        if not (0.0 <= self.t_one_fraction <= 1.0 and 0.0 <= self.s_zero_fraction <= 1.0):
            raise ValueError(f"t_one_fraction and s_zero_fraction must lie in [0, 1]; got {self.t_one_fraction}, "
                             f"{self.s_zero_fraction}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1; got {self.group_size}")
        if self.r_schedule not in ("eta", "t", "relative"):
            raise ValueError(f"unknown r_schedule {self.r_schedule!r}; expected 'eta', 't' or 'relative'")
        if self.estimator not in ("v", "u"):
            raise ValueError(f"unknown estimator {self.estimator!r}; expected 'v' or 'u'")
        if self.estimator == "u" and self.group_size < 2:
            raise ValueError("the unbiased estimator needs group_size >= 2")
        if self.weighting not in ("uniform", "imm"):
            raise ValueError(f"unknown weighting {self.weighting!r}; expected 'uniform' or 'imm'")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1); got {self.target_ema}")
        if not 0.0 <= self.t_min < 1.0 or not 0.0 < self.t_eta_max < 1.0:
            raise ValueError(f"need 0 <= t_min < 1 and 0 < t_eta_max < 1; got {self.t_min}, {self.t_eta_max}")
        if self.k < 0 or self.kernel_scale <= 0:
            raise ValueError(f"need k >= 0 and kernel_scale > 0; got {self.k}, {self.kernel_scale}")


def laplace_mmd2(y_t: Tensor, y_r: Tensor, bandwidth: Tensor, estimator: str = "v", eps: float = 1e-8) -> Tensor:
    r"""Per-group MMD² with the Laplace kernel :math:`\exp(-\max(\|x-y\|,\epsilon)/h_g)`.

    Args:
        y_t: Particles, shape (G, M, ...).
        y_r: Particles, shape (G, M, ...).
        bandwidth: Per-group bandwidth h_g, shape (G,).
        estimator: ``v`` (all M² pairs) or ``u`` (pairs i != j).
        eps: Floor of the distance (keeps the gradient finite at zero distance).

    Returns:
        Shape (G,): the mean over pairs of k_tt + k_rr - k_tr - k_rt.
    """
    if y_t.shape != y_r.shape or y_t.dim() < 3:
        raise ValueError(f"y_t and y_r must both have shape (groups, M, ...); got {tuple(y_t.shape)}, "
                         f"{tuple(y_r.shape)}")
    g, m = y_t.shape[:2]
    a, b = y_t.reshape(g, m, -1), y_r.reshape(g, m, -1)

    def k(x: Tensor, y: Tensor) -> Tensor:
        sq = (x[:, :, None, :] - y[:, None, :, :]).pow(2).sum(-1)
        return torch.exp(-torch.sqrt(sq.clamp(min=eps * eps)) / bandwidth[:, None, None])

    ktt, krr, ktr = k(a, a), k(b, b), k(a, b)
    terms = ktt + krr - ktr - ktr.transpose(1, 2)
    if estimator == "u":
        off = ~torch.eye(m, dtype=torch.bool, device=a.device)
        return (terms * off).sum((1, 2)) / (m * (m - 1))
    return terms.mean((1, 2))


def imm_r(s: Tensor, t: Tensor, cfg: IMMConfig) -> Tensor:
    r"""The intermediate time :math:`r = \max(s, \cdot)` by a constant decrement in η = t/(1-t) or in t."""
    if cfg.r_schedule == "t":
        return torch.maximum(s, t - 2.0 ** (-cfg.k))
    if cfg.r_schedule == "relative":
        return t - (t - s) * 2.0 ** (-cfg.k)
    eta_max = cfg.t_eta_max / (1 - cfg.t_eta_max)
    eta_t = torch.clamp(t, max=cfg.t_eta_max) / (1 - torch.clamp(t, max=cfg.t_eta_max))
    eta_r = (eta_t - eta_max / 2.0**cfg.k).clamp(min=0.0)
    r = eta_r / (1 + eta_r)
    return torch.maximum(s, torch.minimum(r, t))


def imm_weight(t: Tensor, b: float = 2.0, a: int = 1) -> Tensor:
    r"""IMM's weight, finite on [0, 1]:

    :math:`w = \tfrac12\,\mathrm{sigmoid}(b-\lambda_t)\,\frac{2}{t(1-t)}\,\frac{(1-t)^a}{(1-t)^2+t^2}`.
    """
    t = t.clamp(1e-6, 1 - 1e-6)
    lam = 2 * torch.log((1 - t) / t)
    return 0.5 * torch.sigmoid(b - lam) * (2 / (t * (1 - t))) * (1 - t) ** a / ((1 - t) ** 2 + t**2)


@register
class IMM(Method):
    """Inductive moment matching: Laplace-kernel MMD between f_{t->s}(x_t) and sg f_{r->s}(x_r) per group."""

    name = "imm"
    description = "IMM: groups of M particles, Laplace-kernel MMD of f_{t->s}(x_t) vs EMA f_{r->s}(x_r)."
    config_class = IMMConfig
    parameterization = "average_velocity"
    needs_teacher = False
    needs_data = True

    def __init__(self, student: FlowMap, teacher: torch.nn.Module | None = None,
                 config: IMMConfig | None = None) -> None:
        super().__init__(student, teacher, config)
        self.require_parameterization()
        self.target = self.frozen_copy()

    def group_times(self, u: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
        r"""Per-group (s, r, t) from the first row of each group, repeated to every particle, shape (G*M,).

        :math:`t \sim U[t_{min}, 1]` (t = 1 on a fraction ``t_one_fraction`` of the groups, column 2),
        :math:`s \sim U[0, t]` (s = 0 on a fraction ``s_zero_fraction``, column 3), r from :func:`imm_r`.
        With t ~ U(0,1), s ~ U(0,t) only ~0.3 % of the groups land near the (t, s) = (1, 0) corner that the
        1-step sampler queries; the point masses put training there.
        """
        cfg = self.config
        m = cfg.group_size
        ug = u[: groups * m].reshape(groups, m, -1)[:, 0]
        t = cfg.t_min + (1 - cfg.t_min) * ug[:, U_T]
        t = torch.where(ug[:, U_SELECT] < cfg.t_one_fraction, torch.ones_like(t), t)
        s = torch.where(ug[:, U_AUX] < cfg.s_zero_fraction, torch.zeros_like(t), t * ug[:, U_S])
        r = imm_r(s, t, cfg)
        return tuple(v.repeat_interleave(m) for v in (s, r, t))  # type: ignore[return-value]

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.x0 is None:
            raise ValueError("imm needs data batches (x0) for the pairs (x0, x1)")
        cfg, m = self.config, self.config.group_size
        if batch.size % m:
            raise ValueError(f"imm: batch size {batch.size} must be divisible by group_size {m}")
        groups = batch.size // m
        s, r, t = self.group_times(batch.u, groups)
        x0, x1, cond = batch.x0, batch.x1, batch.cond
        x_t = LinearPath().interpolate(x0, x1, t)
        x_r = LinearPath().interpolate(x0, x1, r)
        if cfg.interpolant == "batch":
            x_b = x_t - bcast(t - r, x_t) * batch_velocity(x_t, t, x0, cond)
            x_r = torch.where(bcast(t >= cfg.batch_t_min, x_t), x_b, x_r)
        with torch.no_grad():
            y_r = self.target(x_r, r, s, cond)
        y_t = self.student(x_t, t, s, cond)
        tg, sg = t[::m], s[::m]
        dim = math.prod(x0.shape[1:])
        bandwidth = (dim * (tg - sg) * cfg.kernel_scale).clamp(min=1e-6)
        mmd = laplace_mmd2(y_t.reshape(groups, m, *x0.shape[1:]), y_r.reshape(groups, m, *x0.shape[1:]),
                           bandwidth, cfg.estimator, cfg.kernel_eps)
        w = imm_weight(tg, cfg.weight_b) if cfg.weighting == "imm" else torch.ones_like(tg)
        loss = (w * mmd).mean()
        return loss, {"loss": float(loss.detach()), "mmd2": float(mmd.detach().mean())}

    def after_update(self, name: str, step: int) -> None:
        if name == "student":
            ema_update_(self.target, self.student, self.config.target_ema)
