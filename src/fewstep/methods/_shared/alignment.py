r"""Marginal-distribution alignment (MA): the window-KL regularizer shared by reflow and PeRFlow (docs/methods.md §6).

For a window [t_e, t_s] (sampling goes t_s -> t_e), draw :math:`x_{t_s} \sim p_{t_s}` and push it through the
student's window map :math:`\Phi_\theta` to the exact window end :math:`t_e` (t_e = 0 included). By the change of
variables, :math:`\log q_{t_e}(\Phi_\theta(x)) = \log p_{t_s}(x) + \Delta_\theta(x)` with

* ``ode`` (the default; the paper's form): the student's velocity ODE with
  :math:`\Delta = \int_{t_e}^{t_s} \nabla\!\cdot u_\theta(x_\tau,\tau)\,d\tau`, integrated on M sub-steps of an
  explicit RK solver applied to the augmented state; the divergence is exact (d backward passes) when the sample
  has at most ``exact_dim`` entries, else Hutchinson with K probes held fixed along the path (``exact`` and
  ``hutchinson`` force one of the two);
* ``jump``: :math:`\Delta = -\sum_i \log|\det \partial f_{\tau_i\to\tau_{i+1}}/\partial x|`, the log-determinant of
  the M discrete jumps the student samples with. It is a log-density only where every jump is injective
  (det > 0 everywhere); a folding jump makes it something that is not the KL.

The reverse KL is :math:`KL_k(\theta) = E[\log p_{t_s}(x) + \Delta_\theta(x) - \log \tilde p_{t_e}(\Phi_\theta(x))]`;
the first term is constant, so its gradient is that of the surrogate

.. math::
    L_{MA} = E\big[\Delta_\theta(x) - \langle sg(\tilde s(x_{end})),\, x_{end}\rangle\big],
    \qquad x_{end} = \Phi_\theta(x),

with the frozen teacher's score converted from its velocity (:meth:`AffinePath.velocity_to_score`, analytic and
learned teachers alike). Target at the window end (:func:`end_score`): :math:`\tilde p_{t_e} = p_{t_e}` when
:math:`t_e \ge \varepsilon` (``t_min``). Below :math:`\varepsilon` the conversion :math:`s = -\hat x_1/\sigma_t` is
singular (at t = 0 the velocity carries no score information: on the linear path :math:`v(x, 0) = -x` for every
teacher), so the target is :math:`p_{t_e}` smoothed by an independent Gaussian: with
:math:`c = \alpha_\varepsilon/\alpha_{t_e}`, :math:`x_\varepsilon / c = \alpha_{t_e} x_0 + (\sigma_\varepsilon/c) x_1`
has the law of :math:`x_{t_e} + \sigma_* z`, :math:`\sigma_*^2 = (\sigma_\varepsilon/c)^2 - \sigma_{t_e}^2`, so

.. math::
    \tilde p_{t_e}(x) = c^d p_\varepsilon(c x), \qquad \tilde s(x) = c\, s_T(c x, \varepsilon),

one teacher call at :math:`\varepsilon`, never below (linear path, t_e = 0: data smoothed by
:math:`\sigma_* = \varepsilon/(1-\varepsilon)`). The student's map is not changed: it runs to t_e. When the
teacher density is known (``log_prob``), the KL against :math:`\tilde p_{t_e}` is returned for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.core.paths import LinearPath
from fewstep.core.utils import as_time, bcast
from fewstep.sampling.integrators import RK_METHODS, rk_step
from fewstep.sampling.logdensity import divergence, jump_logdet, make_probes
from fewstep.teachers.base import teacher_velocity

__all__ = ["MAResult", "MA_MODES", "EXACT_DIM", "end_score", "end_log_prob", "ma_loss", "resolve_mode",
           "teacher_score", "window_logdensity"]

MA_MODES: tuple[str, ...] = ("ode", "exact", "hutchinson", "jump")
#: ``ode`` uses the exact divergence up to this many entries per sample, Hutchinson above.
EXACT_DIM = 16


@dataclass
class MAResult:
    """Output of :func:`ma_loss`.

    Attributes:
        loss: The surrogate :math:`L_{MA}` (scalar; its gradient is that of the window KL).
        kl: Window KL estimate :math:`E[\\log q_{t_e} - \\log \\tilde p_{t_e}]` (detached; None without
            ``log_prob``).
        delta: Per-row :math:`\\Delta = \\log q_{t_e}(x_{end}) - \\log p_{t_s}(x)` (with graph).
        x_end: Student window endpoints at the exact window ends (with graph).
        t_end: The window ends, shape (batch,).
        mode: The mode used (``ode`` resolved to ``exact`` or ``hutchinson``).
        folded: ``jump`` only: share of rows whose jump folds (det <= 0; Δ is not a log-density there).
    """

    loss: Tensor
    kl: Tensor | None
    delta: Tensor
    x_end: Tensor
    t_end: Tensor
    mode: str
    folded: float | None = None


def resolve_mode(mode: str, x: Tensor, exact_dim: int = EXACT_DIM) -> str:
    """``ode`` -> ``exact`` when one sample of ``x`` has at most ``exact_dim`` entries, else ``hutchinson``."""
    if mode not in MA_MODES:
        raise ValueError(f"unknown ma_mode {mode!r}; expected one of {MA_MODES}")
    if mode != "ode":
        return mode
    return "exact" if x[0].numel() <= exact_dim else "hutchinson"


def teacher_score(teacher: Any, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
    r"""Frozen teacher score :math:`\nabla\log p_t(x) = -\hat x_1/\sigma_t`, converted from its velocity (no grad)."""
    with torch.no_grad():
        v = teacher_velocity(teacher, x, t, cond, guidance)
        path = getattr(teacher, "path", LinearPath())
        return path.velocity_to_score(v, x, t).to(x.dtype)


def _end_times(teacher: Any, t_end: Tensor, t_min: float) -> tuple[Tensor, Tensor]:
    r"""(score time :math:`\max(t_e, \varepsilon)`, rescale :math:`c = \alpha_\varepsilon/\alpha_{t_e}` or 1)."""
    low = t_end < t_min
    if t_min <= 0.0 and bool((t_end <= 0.0).any()):
        raise ValueError("a window ending at t=0 needs ma_t_min > 0 (the teacher score is singular at t=0)")
    tq = torch.where(low, torch.full_like(t_end, t_min), t_end)
    path = getattr(teacher, "path", LinearPath())
    c = torch.where(low, path.coefficients(tq)[0] / path.coefficients(t_end)[0], torch.ones_like(t_end))
    return tq, c


def end_score(teacher: Any, x: Tensor, t_end: Tensor, t_min: float, cond: Tensor | None = None,
              guidance: float = 1.0) -> Tensor:
    r"""Score of the window-end target :math:`\tilde s(x) = c\,s_T(c x, \max(t_e, \varepsilon))` (module docstring).

    Args:
        teacher: Frozen teacher (its velocity and path).
        x: Window endpoints, shape (batch, ...).
        t_end: Window ends, shape (batch,).
        t_min: :math:`\varepsilon`, the smallest time at which the teacher score is evaluated.
        cond: Optional labels.
        guidance: CFG weight.

    Returns:
        The target score at x, shaped like x (no gradient).
    """
    tq, c = _end_times(teacher, t_end, t_min)
    cb = bcast(c, x)
    return cb * teacher_score(teacher, cb * x, tq, cond, guidance)


def end_log_prob(teacher: Any, x: Tensor, t_end: Tensor, t_min: float, cond: Tensor | None = None) -> Tensor:
    r""":math:`\log\tilde p_{t_e}(x) = \log p_{\max(t_e,\varepsilon)}(c x) + d\log c` (needs ``teacher.log_prob``)."""
    tq, c = _end_times(teacher, t_end, t_min)
    return teacher.log_prob(bcast(c, x) * x, tq, cond) + x[0].numel() * torch.log(c)


def _augmented_velocity(student: Any, y: Tensor, tau: Tensor, cond: Tensor | None, mode: str,
                        probes: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""Right-hand side :math:`(u_\theta(y, \tau), -\nabla\!\cdot u_\theta(y, \tau))` of the augmented window ODE."""
    box: dict[str, Tensor] = {}

    def vel(z: Tensor, tt: Tensor) -> Tensor:
        box["v"] = student.velocity(z, tt, cond)
        return box["v"]

    div = divergence(vel, y, tau, method=mode, probes=probes, create_graph=create_graph)
    v = box["v"] if create_graph else box["v"].detach()
    return v, -div


def window_logdensity(student: Any, x: Tensor, t_start: Tensor, t_end: Tensor, cond: Tensor | None = None,
                      mode: str = "ode", substeps: int = 4, solver: str = "rk4", probes: Tensor | None = None,
                      create_graph: bool = True, exact_dim: int = EXACT_DIM,
                      stats: dict[str, float] | None = None) -> tuple[Tensor, Tensor]:
    r"""Push x through the student's window map and return (x_end, Δ) with Δ = log q_end(x_end) - log q_start(x).

    Sub-grid :math:`\tau_i = t_s + (t_e - t_s) i/M` per row. ``jump``: M jumps of ``student(x, t, s, cond)`` with
    :math:`\Delta = -\sum\log|\det\partial f/\partial x|`. ``ode``/``exact``/``hutchinson``: the augmented ODE
    :math:`dx/d\tau = u_\theta,\ d\ell/d\tau = -\nabla\!\cdot u_\theta` with the explicit RK ``solver``.

    Args:
        student: Flow map with ``forward(x, t, s, cond)`` and ``velocity(x, t, cond)``.
        x: Window-start points, shape (batch, ...).
        t_start: Window starts, shape (batch,).
        t_end: Window ends (< t_start), shape (batch,).
        cond: Optional labels.
        mode: ``ode``, ``exact``, ``hutchinson`` or ``jump`` (see :func:`resolve_mode`).
        substeps: M >= 1.
        solver: ``euler``, ``heun`` or ``rk4`` (ODE modes).
        probes: Hutchinson probes (K, *x.shape), held fixed along the path (required when the mode is Hutchinson).
        create_graph: Keep the graph so Δ and x_end are differentiable w.r.t. the student.
        exact_dim: Largest sample size for which ``ode`` uses the exact divergence.
        stats: If given, ``jump`` writes ``folded`` into it: the share of rows where some jump has
            :math:`\det\partial f/\partial x \le 0` (there Δ is not a log-density).

    Returns:
        (x_end, Δ): the window endpoints, shaped like ``x``, and the per-row log-density change, shape (batch,).
    """
    mode = resolve_mode(mode, x, exact_dim)
    if substeps < 1:
        raise ValueError(f"ma_substeps must be >= 1, got {substeps}")
    if solver not in RK_METHODS:
        raise ValueError(f"unknown MA solver {solver!r}; expected one of {RK_METHODS}")
    if bool((t_end >= t_start).any()):
        raise ValueError("every MA window needs t_end < t_start (sampling runs from t_start down to t_end)")
    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    folded = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    taus = [t_start + (t_end - t_start) * (i / substeps) for i in range(substeps + 1)]
    for i in range(substeps):
        t0, t1 = taus[i], taus[i + 1]
        if mode == "jump":
            jump = jump_logdet(student, x, t0, t1, cond=cond, create_graph=create_graph)
            x, delta, folded = jump.y, delta - jump.logabsdet, folded | (jump.sign <= 0)
            continue
        x, delta = rk_step(lambda state, tau: _augmented_velocity(student, state[0], tau, cond, mode, probes,
                                                                  create_graph), (x, delta), t0, t1, solver)
    if stats is not None and mode == "jump":
        stats["folded"] = float(folded.float().mean())
    return x, delta


def ma_loss(student: Any, teacher: Any, x_start: Tensor, t_start: Tensor | float, t_end: Tensor | float,
            cond: Tensor | None = None, mode: str = "ode", substeps: int = 4, solver: str = "rk4",
            num_probes: int = 4, t_min: float = 0.02, guidance: float = 1.0, score_teacher: Any = None,
            generator: torch.Generator | None = None, compute_kl: bool = True,
            exact_dim: int = EXACT_DIM) -> MAResult:
    r"""The MA surrogate :math:`L_{MA} = E[\Delta_\theta - \langle sg(\tilde s(x_{end})), x_{end}\rangle]`.

    Args:
        student: The flow-map student being trained.
        teacher: Frozen teacher defining the target marginals p_t (its score; its ``log_prob`` if present).
        x_start: Samples of the teacher marginal :math:`p_{t_s}`, shape (batch, ...).
        t_start: Window starts (scalar or (batch,)).
        t_end: Exact window ends (scalar or (batch,)); 0 is allowed when ``t_min`` > 0.
        cond: Optional labels.
        mode: ``ode`` (default), ``exact``, ``hutchinson`` or ``jump`` (valid only for injective jumps).
        substeps: M sub-steps per window.
        solver: Sub-step integrator for the ODE modes.
        num_probes: K Hutchinson probes (drawn once per call, held fixed along the path).
        t_min: :math:`\varepsilon`: window ends below it are scored against the Gaussian-smoothed target
            :math:`\tilde p_{t_e}` (module docstring); the student still runs to the exact end.
        guidance: CFG weight of the teacher score.
        score_teacher: Teacher whose score/log_prob define the target marginals (default ``teacher``). For
            k-rectified flow (k >= 2) pass the original teacher: a reflow student's velocity is not the
            marginal velocity of the linear path (its x1 and x0 are coupled), so its score conversion is invalid.
        generator: Generator for the probes.
        compute_kl: Also estimate the window KL when the target has ``log_prob``.
        exact_dim: Largest sample size for which ``ode`` uses the exact divergence.

    Returns:
        The surrogate loss with the window KL estimate, Δ, x_end and t_end (see :class:`MAResult`).
    """
    target = score_teacher if score_teacher is not None else teacher
    ts = as_time(t_start, x_start, "t_start")
    te = as_time(t_end, x_start, "t_end")
    if bool((te >= ts).any()):
        raise ValueError(f"every MA window needs t_end < t_start; got t_start in [{float(ts.min())}, "
                         f"{float(ts.max())}], t_end in [{float(te.min())}, {float(te.max())}]")
    if not 0.0 <= t_min < 1.0 or not math.isfinite(t_min):
        raise ValueError(f"ma_t_min must lie in [0, 1); got {t_min}")
    mode = resolve_mode(mode, x_start, exact_dim)
    probes = make_probes(x_start, num_probes, generator) if mode == "hutchinson" else None
    stats: dict[str, float] = {}
    x_end, delta = window_logdensity(student, x_start, ts, te, cond, mode, substeps, solver, probes, True,
                                     stats=stats)
    score = end_score(target, x_end.detach(), te, t_min, cond, guidance)
    dims = tuple(range(1, x_end.dim()))
    loss = (delta - (score * x_end).sum(dim=dims)).mean()
    kl = None
    if compute_kl and guidance == 1.0 and hasattr(target, "log_prob"):
        with torch.no_grad():
            lp_s = target.log_prob(x_start, ts, cond).to(delta.dtype)
            lp_e = end_log_prob(target, x_end.detach(), te, t_min, cond).to(delta.dtype)
            kl = (lp_s + delta.detach() - lp_e).mean()
    return MAResult(loss=loss, kl=kl, delta=delta, x_end=x_end, t_end=te, mode=mode, folded=stats.get("folded"))
