r"""Marginal-distribution alignment (MA): the window-KL regularizer shared by reflow and PeRFlow (docs/methods.md §6).

For a window [t_e, t_s] (sampling goes t_s -> t_e), draw :math:`x_{t_s} \sim p_{t_s}` and push it through the
student's window map :math:`\Phi_\theta`. By the change of variables,
:math:`\log q_{t_e}(\Phi_\theta(x)) = \log p_{t_s}(x) + \Delta_\theta(x)` with

* ``exact`` / ``hutchinson``: :math:`\Delta = \int_{t_e}^{t_s} \nabla\!\cdot u_\theta(x_\tau,\tau)\,d\tau` along the
  student velocity ODE, integrated on M sub-steps (Euler/Heun/RK4 applied to the augmented state); the
  divergence is exact (d backward passes) or Hutchinson with K probes held fixed along the path;
* ``jump``: :math:`\Delta = -\sum_i \log|\det \partial f_{\tau_i\to\tau_{i+1}}/\partial x|`, the exact
  log-determinant of the M discrete jumps the student takes at inference (for a velocity student with M=1 this
  is its one Euler step). This is the better-founded choice for a few-step student: it aligns the
  distribution the student actually samples from, not that of its continuous ODE, which it never integrates.

The reverse KL is :math:`KL_k(\theta) = E[\log p_{t_s}(x) + \Delta_\theta(x) - \log p_{t_e}(\Phi_\theta(x))]`; the
first term is constant, so its gradient is that of the surrogate

.. math::
    L_{MA} = E\big[\Delta_\theta(x) - \langle sg(s_T(x_{end}, t_e)),\, x_{end}\rangle\big],
    \qquad x_{end} = \Phi_\theta(x),

with the frozen teacher's score :math:`s_T = \nabla\log p_t` converted from its velocity
(:meth:`AffinePath.velocity_to_score`). Only scores are needed; :math:`t_e` is clamped to ``t_min`` where the
conversion is singular. When the teacher density is known (``log_prob``), the KL itself is returned for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.core.paths import LinearPath
from fewstep.core.utils import as_time
from fewstep.sampling.integrators import RK_METHODS, rk_step
from fewstep.sampling.logdensity import divergence, jump_logdet, make_probes
from fewstep.teachers.base import teacher_velocity

__all__ = ["MAResult", "MA_MODES", "ma_loss", "teacher_score", "window_logdensity"]

MA_MODES: tuple[str, ...] = ("exact", "hutchinson", "jump")

@dataclass
class MAResult:
    """Output of :func:`ma_loss`.

    Attributes:
        loss: The surrogate :math:`L_{MA}` (scalar; its gradient is that of the window KL).
        kl: Window KL estimate :math:`E[\\log q_{t_e} - \\log p_{t_e}]` (detached), or None without ``log_prob``.
        delta: Per-row :math:`\\Delta = \\log q_{t_e}(x_{end}) - \\log p_{t_s}(x)` (with graph).
        x_end: Student window endpoints (with graph).
        t_end: The (clamped) window end times, shape (batch,).
    """

    loss: Tensor
    kl: Tensor | None
    delta: Tensor
    x_end: Tensor
    t_end: Tensor


def teacher_score(teacher: Any, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
    r"""Frozen teacher score :math:`\nabla\log p_t(x)` (no gradient), from ``score`` or converted from the velocity."""
    with torch.no_grad():
        v = teacher_velocity(teacher, x, t, cond, guidance)
        path = getattr(teacher, "path", LinearPath())
        return path.velocity_to_score(v, x, t).to(x.dtype)


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
                      mode: str = "jump", substeps: int = 1, solver: str = "euler", probes: Tensor | None = None,
                      create_graph: bool = True) -> tuple[Tensor, Tensor]:
    r"""Push x through the student's window map and return (x_end, Δ) with Δ = log q_end(x_end) - log q_start(x).

    Sub-grid :math:`\tau_i = t_s + (t_e - t_s) i/M` per row. ``jump``: M jumps of ``student(x, t, s, cond)`` with
    :math:`\Delta = -\sum\log|\det\partial f/\partial x|`. ``exact``/``hutchinson``: the augmented ODE
    :math:`dx/d\tau = u_\theta,\ d\ell/d\tau = -\nabla\!\cdot u_\theta` with the explicit RK ``solver``.

    Args:
        student: Flow map with ``forward(x, t, s, cond)`` and ``velocity(x, t, cond)``.
        x: Window-start points, shape (batch, ...).
        t_start: Window starts, shape (batch,).
        t_end: Window ends (< t_start), shape (batch,).
        cond: Optional labels.
        mode: ``jump``, ``exact`` or ``hutchinson``.
        substeps: M >= 1.
        solver: ``euler``, ``heun`` or ``rk4`` (ODE modes).
        probes: Hutchinson probes (K, *x.shape), held fixed along the path.
        create_graph: Keep the graph so Δ and x_end are differentiable w.r.t. the student.

    Returns:
        (x_end, Δ): the window endpoints, shaped like ``x``, and the per-row log-density change, shape (batch,).
    """
    if mode not in MA_MODES:
        raise ValueError(f"unknown ma_mode {mode!r}; expected one of {MA_MODES}")
    if substeps < 1:
        raise ValueError(f"ma_substeps must be >= 1, got {substeps}")
    if solver not in RK_METHODS:
        raise ValueError(f"unknown MA solver {solver!r}; expected one of {RK_METHODS}")
    if bool((t_end >= t_start).any()):
        raise ValueError("every MA window needs t_end < t_start (sampling runs from t_start down to t_end)")
    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    taus = [t_start + (t_end - t_start) * (i / substeps) for i in range(substeps + 1)]
    for i in range(substeps):
        t0, t1 = taus[i], taus[i + 1]
        if mode == "jump":
            x, ld = jump_logdet(student, x, t0, t1, cond=cond, create_graph=create_graph)
            delta = delta - ld
            continue
        x, delta = rk_step(lambda state, tau: _augmented_velocity(student, state[0], tau, cond, mode, probes,
                                                                  create_graph), (x, delta), t0, t1, solver)
    return x, delta


def ma_loss(student: Any, teacher: Any, x_start: Tensor, t_start: Tensor | float, t_end: Tensor | float,
            cond: Tensor | None = None, mode: str = "jump", substeps: int = 1, solver: str = "euler",
            num_probes: int = 1, t_min: float = 0.02, guidance: float = 1.0, score_teacher: Any = None,
            generator: torch.Generator | None = None, compute_kl: bool = True) -> MAResult:
    r"""The MA surrogate :math:`L_{MA} = E[\Delta_\theta - \langle sg(s_T(x_{end}, t_e)), x_{end}\rangle]`.

    Args:
        student: The flow-map student being trained.
        teacher: Frozen teacher defining the target marginals p_t (its score; its ``log_prob`` if present).
        x_start: Samples of the teacher marginal :math:`p_{t_s}`, shape (batch, ...).
        t_start: Window starts (scalar or (batch,)).
        t_end: Window ends; clamped up to ``t_min``.
        cond: Optional labels.
        mode: ``jump`` (default), ``exact`` or ``hutchinson``.
        substeps: M sub-steps per window.
        solver: Sub-step integrator for the ODE modes.
        num_probes: K Hutchinson probes (drawn once per call, held fixed along the path).
        t_min: Smallest window end (the score conversion is singular at t=0).
        guidance: CFG weight of the teacher score.
        score_teacher: Teacher whose score/log_prob define the target marginals (default ``teacher``). For
            k-rectified flow (k >= 2) pass the original teacher: a reflow student's velocity is not the
            marginal velocity of the linear path (its x1 and x0 are coupled), so its score conversion is invalid.
        generator: Generator for the probes.
        compute_kl: Also estimate the window KL when the target has ``log_prob``.

    Returns:
        The surrogate loss with the window KL estimate, Δ, x_end and the clamped t_end (see :class:`MAResult`).
    """
    target = score_teacher if score_teacher is not None else teacher
    ts = as_time(t_start, x_start, "t_start")
    te = as_time(t_end, x_start, "t_end").clamp(min=t_min)
    if bool((te >= ts).any()):
        raise ValueError(f"MA window starts must exceed t_min={t_min} and the window ends; got t_start in "
                         f"[{float(ts.min())}, {float(ts.max())}]")
    probes = make_probes(x_start, num_probes, generator) if mode == "hutchinson" else None
    x_end, delta = window_logdensity(student, x_start, ts, te, cond, mode, substeps, solver, probes, True)
    score = teacher_score(target, x_end.detach(), te, cond, guidance)
    dims = tuple(range(1, x_end.dim()))
    loss = (delta - (score * x_end).sum(dim=dims)).mean()
    kl = None
    if compute_kl and guidance == 1.0 and hasattr(target, "log_prob"):
        with torch.no_grad():
            lp_s = target.log_prob(x_start, ts, cond).to(delta.dtype)
            lp_e = target.log_prob(x_end.detach(), te, cond).to(delta.dtype)
            kl = (lp_s + delta.detach() - lp_e).mean()
    return MAResult(loss=loss, kl=kl, delta=delta, x_end=x_end, t_end=te)
