r"""Shared pieces of the distribution-matching family (DMD, DMD2, decoupled DMD, CDM).

Notation (linear path, t=1 noise): the student's data prediction at an anchor :math:`(x_\sigma, \sigma)` is
:math:`\hat x_0^S = f_{\sigma\to 0}(x_\sigma)`; it is re-noised as
:math:`x_\tau = (1-\tau)\,sg(\hat x_0^S) + \tau\epsilon`
and the frozen real teacher and the online fake score give x0-predictions
:math:`\hat x_0^{r} = x_\tau - \tau v_{real}(x_\tau,\tau)`, :math:`\hat x_0^{f} = x_\tau - \tau v_{fake}(x_\tau,\tau)`.

* DM (distribution-matching) gradient, DMD2 code form with per-sample normalisation
  :math:`n = \max(\mathrm{mean}|\hat x_0^{r} - sg(\hat x_0^S)|, \text{floor})`:
  :math:`g = (\hat x_0^{f} - \hat x_0^{r})/n`, loss :math:`\tfrac12\|\hat x_0^S - sg(\hat x_0^S - g)\|^2` (mean over
  elements), whose gradient w.r.t. :math:`\hat x_0^S` is g/D. The CDM code writes the same update as
  :math:`\|\hat x_0^S - sg(\hat x_0^S + \Delta)\|^2` with :math:`\Delta = -g` (twice the gradient).
* CA (CFG-augmentation) term: :math:`\Delta_{CA} = (\hat x_0^{c} - \hat x_0^{u})/n_{CA}` from the real teacher's
  conditional and unconditional predictions; it enters with weight :math:`(\alpha - 1)` so that
  :math:`\nabla L_{DMD}(\text{cfg } \alpha) = \nabla L_{DM} + (\alpha-1)\nabla L_{CA}` (decoupled DMD).
* Fake score: a velocity network trained by flow matching on student samples,
  :math:`L_{fake} = \|v_{fake}(x_\tau,\tau) - (\epsilon - sg(\hat x_0^S))\|^2`.
* Backward simulation: run the student from noise on a decreasing schedule without gradient and stop at a
  per-sample anchor index; only the anchor's x0-prediction carries gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.core.paths import LinearPath
from fewstep.core.utils import bcast
from fewstep.teachers.base import teacher_velocity

__all__ = ["RENOISE_KINDS", "Anchor", "renoise_time", "renoise", "teacher_x0", "fake_x0", "normaliser", "dm_loss",
           "ca_loss", "fake_score_loss", "make_fake_score", "fixed_schedule", "dynamic_schedule",
           "backward_simulate", "anchor_index", "dm_terms"]

RENOISE_KINDS: tuple[str, ...] = ("uniform", "uniform_capped")


def _flat_mean(x: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dimensions, shape (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def renoise_time(u: Tensor, kind: str = "uniform", sigma: Tensor | None = None, t_min: float = 0.02,
                 t_max: float = 0.98) -> Tensor:
    r"""Re-noise levels :math:`\tau` from uniforms u (shape (B,)).

    * ``uniform``: :math:`\tau = t_{min} + (t_{max} - t_{min}) u` (DMD2: U[0.02, 0.98]).
    * ``uniform_capped``: :math:`\tau = \mathrm{clamp}(u\,\sigma, t_{min}, t_{max})`, i.e. U(0, σ_student) (CDM's CA).

    Args:
        u: Uniforms in [0, 1), shape (B,).
        kind: ``uniform`` or ``uniform_capped``.
        sigma: The student anchor times, shape (B,), required for ``uniform_capped``.
        t_min: Smallest level.
        t_max: Largest level.

    Returns:
        The re-noise levels :math:`\tau`, shape (B,).
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1 for re-noise levels; got t_min={t_min}, t_max={t_max}")
    if kind == "uniform":
        return t_min + (t_max - t_min) * u
    if kind == "uniform_capped":
        if sigma is None or sigma.shape != u.shape:
            raise ValueError("uniform_capped re-noising needs the student times sigma with the shape of u "
                             f"{tuple(u.shape)}; got {None if sigma is None else tuple(sigma.shape)}")
        return (u * sigma).clamp(t_min, t_max)
    raise ValueError(f"unknown re-noise schedule {kind!r}; expected one of {RENOISE_KINDS}")


def renoise(x0: Tensor, tau: Tensor, eps: Tensor) -> Tensor:
    r"""Forward noising on the linear path, :math:`x_\tau = (1-\tau) x_0 + \tau \epsilon` (tau of shape (B,))."""
    if eps.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(eps.shape)}")
    return LinearPath().interpolate(x0, eps, tau)


def teacher_x0(teacher: Callable[..., Tensor], x: Tensor, tau: Tensor, cond: Tensor | None,
               guidance: float = 1.0) -> Tensor:
    r"""Real teacher x0-prediction :math:`\hat x_0 = x - \tau v(x,\tau,c;w)` (linear path), without gradient."""
    with torch.no_grad():
        return x - bcast(tau, x) * teacher_velocity(teacher, x, tau, cond, guidance).to(x.dtype)


def fake_x0(fake: nn.Module, x: Tensor, tau: Tensor, cond: Tensor | None) -> Tensor:
    r"""Fake-score x0-prediction :math:`\hat x_0^f = x - \tau v_{fake}(x,\tau,c)`, without gradient."""
    with torch.no_grad():
        return x - bcast(tau, x) * fake.velocity(x, tau, cond)  # type: ignore[operator]


def normaliser(x0_real: Tensor, x0_student: Tensor, floor: float) -> Tensor:
    r"""Per-sample DMD2 normaliser :math:`n = \max(\mathrm{mean}|\hat x_0^{r} - sg(\hat x_0^S)|, \text{floor})`.

    Returns shape (B,).
    """
    if floor <= 0:
        raise ValueError(f"the normaliser floor must be positive; got {floor}")
    return _flat_mean((x0_real - x0_student.detach()).abs()).clamp(min=floor)


def dm_loss(x0_student: Tensor, x0_real: Tensor, x0_fake: Tensor, floor: float = 0.1,
            convention: str = "dmd2") -> tuple[Tensor, Tensor]:
    r"""Distribution-matching loss in x0 space.

    :math:`g = (\hat x_0^f - \hat x_0^r)/n`;
    ``dmd2``: :math:`L = \tfrac12\,\mathrm{mean}(\hat x_0^S - sg(\hat x_0^S - g))^2`;
    ``cdm``: :math:`L = \mathrm{mean}(\hat x_0^S - sg(\hat x_0^S + \Delta))^2` with :math:`\Delta = -g`
    (same direction, twice the gradient).

    Args:
        x0_student: Student x0-prediction carrying gradient, shape (B, ...).
        x0_real: Real-teacher x0-prediction at the re-noised point (no gradient).
        x0_fake: Fake-score x0-prediction at the same point (no gradient).
        floor: Lower clamp of the per-sample normaliser.
        convention: ``dmd2`` or ``cdm``.

    Returns:
        (loss, g): the scalar loss and the per-element DM gradient direction g.
    """
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(f"x0 predictions must share a shape; got {tuple(x0_student.shape)}, "
                         f"{tuple(x0_real.shape)}, {tuple(x0_fake.shape)}")
    g = torch.nan_to_num((x0_fake - x0_real) / bcast(normaliser(x0_real, x0_student, floor), x0_real))
    if convention == "dmd2":
        return 0.5 * ((x0_student - (x0_student - g).detach()) ** 2).mean(), g
    if convention == "cdm":
        return ((x0_student - (x0_student + (-g)).detach()) ** 2).mean(), g
    raise ValueError(f"unknown DM loss convention {convention!r}; expected 'dmd2' or 'cdm'")


def ca_loss(x0_student: Tensor, x0_cond: Tensor, x0_uncond: Tensor, scale: float, floor: float = 0.1,
            norm: Tensor | None = None) -> Tensor:
    r"""CFG-augmentation loss :math:`\mathrm{mean}(\hat x_0^S - sg(\hat x_0^S + s\,\Delta_{CA}))^2 / 2`.

    :math:`\Delta_{CA} = (\hat x_0^c - \hat x_0^u)/n_{CA}` with, by default (the CDM code),
    :math:`n_{CA} = \max(\mathrm{mean}|\hat x_0^c - sg(\hat x_0^S)|, \text{floor})`; ``norm`` (shape (B,)) replaces
    it, e.g. by the DM term's normaliser. The scale is :math:`s = \alpha - 1`, so the term vanishes at guidance
    α = 1. The factor 1/2 makes (α−1)·CA + DM equal the DMD2 loss with the guided real score when both share τ
    and normaliser.
    """
    if not (x0_student.shape == x0_cond.shape == x0_uncond.shape):
        raise ValueError(f"x0 predictions must share a shape; got {tuple(x0_student.shape)}, "
                         f"{tuple(x0_cond.shape)}, {tuple(x0_uncond.shape)}")
    if norm is None:
        norm = normaliser(x0_cond, x0_student, floor)
    elif norm.shape != x0_student.shape[:1]:
        raise ValueError(f"the CA normaliser must have shape ({x0_student.shape[0]},); got {tuple(norm.shape)}")
    delta = torch.nan_to_num(scale * (x0_cond - x0_uncond) / bcast(norm, x0_cond))
    return 0.5 * ((x0_student - (x0_student + delta).detach()) ** 2).mean()


def fake_score_loss(fake: nn.Module, x0: Tensor, tau: Tensor, eps: Tensor, cond: Tensor | None) -> Tensor:
    r"""Flow matching of the fake score on student samples.

    :math:`L = \mathrm{mean}\|v_{fake}(x_\tau,\tau,c) - (\epsilon - x_0)\|^2`.

    Args:
        fake: Velocity network with ``velocity(x, t, cond)`` (a FlowMap with parameterization "velocity").
        x0: Student samples (detached inside), shape (B, ...).
        tau: Times in [0, 1], shape (B,).
        eps: Gaussian noise of x0's shape.
        cond: Class labels or None.

    Returns:
        The scalar loss L.
    """
    x0 = x0.detach()
    x_tau = renoise(x0, tau, eps)
    return ((fake.velocity(x_tau, tau, cond) - (eps - x0)) ** 2).mean()  # type: ignore[operator]


def make_fake_score(student: nn.Module) -> FlowMap:
    """A fake-score velocity network with the student's backbone architecture and weights (a deep copy).

    Args:
        student: The FlowMap student whose backbone is copied.

    Returns:
        A trainable FlowMap with parameterization ``velocity`` around the copied backbone.

    Raises:
        ValueError: if the student is not a FlowMap (its backbone cannot be copied).
    """
    if not isinstance(student, FlowMap):
        raise ValueError(f"the fake score is built from a FlowMap student's backbone; got {type(student).__name__}")
    fake = FlowMap(copy.deepcopy(student.net), "velocity")
    fake.requires_grad_(True)
    return fake


def fixed_schedule(n_steps: int) -> Tensor:
    """The uniform inference schedule [1, (n−1)/n, …, 1/n, 0] (n+1 points, float64)."""
    if n_steps < 1:
        raise ValueError(f"a schedule needs at least one step; got n_steps={n_steps}")
    return torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)


def dynamic_schedule(n_max: int, low: float = 0.25, high: float = 0.95,
                     generator: torch.Generator | None = None, n_min: int = 1) -> Tensor:
    r"""CDM's dynamic continuous schedule: N ~ U{n_min..n_max}, N−1 inner times U(low, high) sorted descending.

    Returns [1.0, inner..., 0.0] (N+1 points, float64). Ties among inner times (probability zero) are nudged
    apart so the schedule stays strictly decreasing.
    """
    if not 1 <= n_min <= n_max:
        raise ValueError(f"need 1 <= n_min <= n_max; got n_min={n_min}, n_max={n_max}")
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"inner schedule range must satisfy 0 < low <= high < 1; got ({low}, {high})")
    n = int(torch.randint(n_min, n_max + 1, (1,), generator=generator))
    inner = low + (high - low) * torch.rand(n - 1, generator=generator, dtype=torch.float64)
    inner = inner.sort(descending=True).values
    for i in range(1, inner.numel()):  # keep strictly decreasing
        if inner[i] >= inner[i - 1]:
            inner[i] = inner[i - 1] - 1e-9
    return torch.cat([torch.ones(1, dtype=torch.float64), inner, torch.zeros(1, dtype=torch.float64)])


@dataclass
class Anchor:
    """A backward-simulated training anchor.

    Attributes:
        x: The state x_σ at the anchor (no gradient), shape (B, ...).
        sigma: Anchor times σ, shape (B,).
        x0: Student x0-prediction f_{σ→0}(x_σ) (with gradient when requested).
        velocity: The student's direction (x_σ − sg(x0))/σ at the anchor (no gradient).
    """

    x: Tensor
    sigma: Tensor
    x0: Tensor
    velocity: Tensor


def backward_simulate(student: Callable[..., Tensor], noise: Tensor, schedule: Tensor, index: Tensor,
                      cond: Tensor | None = None, grad: bool = True, fresh: bool = False) -> Anchor:
    r"""Backward simulation: run :math:`x_{\sigma_{j+1}} = f_{\sigma_j\to\sigma_{j+1}}(x_{\sigma_j})` from noise.

    The steps run without gradient up to a per-sample anchor. With ``fresh`` each step jumps to data and re-noises
    with fresh noise, :math:`x_{\sigma_{j+1}} = (1-\sigma_{j+1}) f_{\sigma_j\to0}(x_{\sigma_j}) + \sigma_{j+1}z`
    (DMD2's backward simulation; the sampler that matches it is gamma = 1).

    Args:
        student: Flow map ``f(x, t, s, cond)``.
        noise: x at schedule[0] (normally t=1), shape (B, ...).
        schedule: Decreasing times ending at 0, shape (N+1,).
        index: Anchor step per sample in {0..N−1}, LongTensor of shape (B,).
        cond: Class labels or None.
        grad: Whether the anchor's x0-prediction carries gradient.
        fresh: Re-noise every step with fresh noise (gamma = 1) instead of the deterministic jump (gamma = 0).

    Returns:
        The :class:`Anchor` at σ = schedule[index].
    """
    sched = torch.as_tensor(schedule, dtype=torch.float64)
    n = sched.numel() - 1
    if sched.dim() != 1 or n < 1 or not bool((sched[1:] < sched[:-1]).all()) or float(sched[-1]) != 0.0:
        raise ValueError("a student schedule must be a strictly decreasing 1-D sequence ending at 0; "
                         f"got {sched.tolist()}")
    if index.shape != (noise.shape[0],) or bool((index < 0).any()) or bool((index >= n).any()):
        raise ValueError(f"anchor indices must have shape ({noise.shape[0]},) with values in [0, {n - 1}]")
    x = noise
    b = noise.shape[0]
    with torch.no_grad():
        for j in range(int(index.max()) if b else 0):
            t = torch.full((b,), float(sched[j]), dtype=noise.dtype, device=noise.device)
            s = torch.full((b,), float(sched[j + 1]), dtype=noise.dtype, device=noise.device)
            if fresh:
                x0 = student(x, t, torch.zeros_like(t), cond=cond)
                nxt = renoise(x0, s, torch.randn_like(x0))
            else:
                nxt = student(x, t, s, cond=cond)
            x = torch.where(bcast(index > j, x), nxt, x)
    sigma = sched.to(noise.device)[index].to(noise.dtype)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        x0 = student(x, sigma, torch.zeros_like(sigma), cond=cond)
    vel = (x - x0.detach()) / bcast(sigma.clamp(min=1e-6), x)
    return Anchor(x=x.detach(), sigma=sigma, x0=x0, velocity=vel)


def anchor_index(u: Tensor, n_steps: int) -> Tensor:
    """Uniform anchor step in {0..n_steps−1} from uniforms u of shape (B,)."""
    return (u * n_steps).floor().long().clamp(0, n_steps - 1)




def dm_terms(teacher: Any, fake: nn.Module, x0_student: Tensor, tau: Tensor, cond: Tensor | None,
             guidance: float = 1.0) -> tuple[Tensor, Tensor]:
    r"""Re-noise :math:`x_\tau = (1-\tau)sg(\hat x_0^S) + \tau\epsilon` (fresh ε).

    Returns (x̂0^real(w), x̂0^fake) at :math:`x_\tau`.
    """
    x_tau = renoise(x0_student.detach(), tau, torch.randn_like(x0_student))
    return teacher_x0(teacher, x_tau, tau, cond, guidance), fake_x0(fake, x_tau, tau, cond)
