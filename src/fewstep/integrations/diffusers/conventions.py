r"""Time conventions: how a diffusers denoiser's (sample, timestep, output) maps onto fewstep's linear path.

fewstep's path is :math:`x_t = (1-t)x_0 + t x_1` with velocity :math:`v = \hat x_1 - \hat x_0` (data at t=0).

**Flow matching** (``FlowMatchEulerDiscreteScheduler``: SD3, Flux, SANA, ...). diffusers writes
:math:`x_\sigma = (1-\sigma)x_0 + \sigma\,\epsilon` and its model predicts :math:`\epsilon - x_0`, and the
scheduler steps :math:`x_{\sigma'} = x_\sigma + (\sigma' - \sigma)\,\mathrm{out}`
(``FlowMatchEulerDiscreteScheduler.step``). So :math:`t = \sigma` and the output *is* fewstep's velocity; the model is
called with ``timestep = T_{train}\cdot t`` (``T_train = num_train_timesteps = 1000``; models that multiply by 1000
internally, such as Flux, get ``timestep = t``). The scheduler's ``shift`` changes only the sampling grid
:math:`\sigma \mapsto s\sigma/(1+(s-1)\sigma)`, never the time map (the teacher's ``sampling_grid`` reads the
scheduler's own sigmas).

**Discrete VP** (DDPM / DDIM / Euler schedulers with ``alphas_cumprod``; epsilon, v or sample prediction).
Step k has :math:`z_k = a_k x_0 + b_k\epsilon` with :math:`a_k = \sqrt{\bar\alpha_k}`,
:math:`b_k = \sqrt{1-\bar\alpha_k}`.
Every affine path is the linear path after a change of time and scale: with :math:`\tau = b/(a+b)`,
:math:`z/(a+b) = (1-\tau)x_0 + \tau\epsilon`. So fewstep's time t maps to the VP state with the same
signal-to-noise ratio, :math:`\lambda(t) = 2\log\frac{1-t}{t} = \log\frac{a^2}{b^2}`, and

.. math::
    z = (a_t + b_t)\,x = \frac{x}{\sqrt{(1-t)^2 + t^2}},\qquad
    a_t = \frac{1-t}{\sqrt{(1-t)^2+t^2}},\ b_t = \frac{t}{\sqrt{(1-t)^2+t^2}},

with the *fractional* timestep k(t) obtained by piecewise-linear interpolation of k against the discrete
log-SNRs :math:`\lambda_k = \log(\bar\alpha_k/(1-\bar\alpha_k))` (exact at the integers: :math:`t = \tau_k`
gives k). The model's :math:`(\hat x_0, \hat\epsilon)` give :math:`v = \hat\epsilon - \hat x_0`. On this map DDIM
with eta = 0 *is* the Euler method: from :math:`x_t = (1-t)\hat x_0 + t\hat\epsilon` one Euler step to t' gives
:math:`(1-t')\hat x_0 + t'\hat\epsilon = z_{k'}/(a_{k'}+b_{k'})`, DDIM's update. A discrete schedule covers only
:math:`t \in [\tau_0, \tau_{T-1}]` (e.g. [0.0099, 0.9937] for the linear betas 1e-4..0.02 over 1000 steps):
outside it the model is called at the clamped time (as :class:`~fewstep.teachers.module.ModuleTeacher` does), so
the velocity on :math:`t > \tau_{T-1}` is the one at :math:`\tau_{T-1}` (the schedule's non-zero terminal SNR).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewstep.core.utils import bcast

__all__ = ["FlowConvention", "VPConvention", "VP_PREDICTIONS", "convention_from_scheduler"]

VP_PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


class FlowConvention:
    """diffusers flow matching: t = sigma, timestep = ``timestep_scale`` * t, output = velocity.

    Args:
        timestep_scale: Model timestep per unit t (1000 for SD3; 1 for models that scale internally).
        shift: The scheduler's static shift (sampling grid only).
    """

    kind = "flow"
    t_min, t_max = 0.0, 1.0

    def __init__(self, timestep_scale: float = 1000.0, shift: float = 1.0) -> None:
        self.timestep_scale, self.shift = float(timestep_scale), float(shift)

    def model_inputs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(model sample, model timestep) = (x, scale * t)."""
        return x, t * self.timestep_scale

    def to_velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r"""The output :math:`\epsilon - x_0` is fewstep's velocity."""
        return out

    def to_model_output(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Inverse of :meth:`to_velocity` (used to export a velocity as the model's native output)."""
        return v

    def __repr__(self) -> str:
        return f"FlowConvention(timestep_scale={self.timestep_scale}, shift={self.shift})"


class VPConvention:
    r"""Discrete VP schedule mapped onto the linear path by equal signal-to-noise ratio (module docstring).

    Args:
        alphas_cumprod: :math:`\bar\alpha_k`, k = 0..T-1, decreasing.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.

    Raises:
        ValueError: for an unknown prediction type or a schedule that is not strictly decreasing in (0, 1).
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in VP_PREDICTIONS:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {VP_PREDICTIONS}")
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ab.numel() < 2 or not bool(((ab > 0) & (ab < 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1)")
        self.prediction_type = prediction_type
        self.alphas_cumprod = ab
        a, b = ab.sqrt(), (1 - ab).sqrt()
        self.tau = b / (a + b)                      # linear-path time of each discrete step, increasing
        self.neg_lam = -torch.log(ab / (1 - ab))    # -log SNR, increasing in k
        self.t_min, self.t_max = float(self.tau[0]), float(self.tau[-1])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def clamp(self, t: Tensor) -> Tensor:
        """t clamped to the schedule's range [tau_0, tau_{T-1}]."""
        return t.clamp(self.t_min, self.t_max)

    def timestep(self, t: Tensor) -> Tensor:
        r"""Fractional step k(t): piecewise-linear in :math:`-\lambda` between the discrete steps (exact at tau_k).

        Differentiable in t (forward-mode AD sees dk/dt); values within 1e-4 of an integer snap to it (float32
        round-off of tau_k) with the derivative kept.
        """
        tc = self.clamp(t).to(torch.float64)
        nl = -2 * torch.log((1 - tc) / tc)
        grid = self.neg_lam.to(tc.device)
        i = torch.searchsorted(grid, nl.detach()).clamp(1, grid.numel() - 1)
        lo, hi = grid[i - 1], grid[i]
        k = (i - 1).to(torch.float64) + (nl - lo) / (hi - lo)
        k = k.clamp(0, grid.numel() - 1)
        near = ((k - k.round()).abs() < 1e-4).detach()
        k = torch.where(near, k + (k.round() - k).detach(), k)
        return k.to(t.dtype if t.is_floating_point() else torch.float32)

    def step_time(self, k: int | Tensor) -> Tensor:
        """The linear-path time tau_k = b_k / (a_k + b_k) of integer step(s) k."""
        return self.tau[torch.as_tensor(k, dtype=torch.long)]

    def _ab(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tc = self.clamp(t)
        n = torch.sqrt((1 - tc) ** 2 + tc ** 2)
        return bcast((1 - tc) / n, x), bcast(tc / n, x), bcast(n, x)

    def model_inputs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""(z, k) = (x / sqrt((1-t)^2 + t^2), k(t)) at the clamped t."""
        _, _, n = self._ab(t, x)
        return x / n, self.timestep(t)

    def x0_eps(self, out: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\hat x_0, \hat\epsilon)` from the model output (the formulas of ``DDIMScheduler.step``)."""
        a, b, n = self._ab(t, x)
        z = x / n
        if self.prediction_type == "epsilon":
            return (z - b * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * z - b * out, a * out + b * z
        return out, (z - a * out) / b

    def to_velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`v = \hat\epsilon - \hat x_0` (the linear path's velocity at the clamped t)."""
        x0, eps = self.x0_eps(out, x, t)
        return eps - x0

    def to_model_output(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        r"""Inverse of :meth:`to_velocity`: :math:`\hat x_0 = x - tv`, :math:`\hat\epsilon = x + (1-t)v` -> output."""
        a, b, n = self._ab(t, x)
        tc = bcast(self.clamp(t), x)
        x0, eps = x - tc * v, x + (1 - tc) * v
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a * eps - b * x0
        return x0

    def grid(self, timesteps: list[int] | Tensor, final_alpha_one: bool = True) -> list[float]:
        """Linear-path grid of a DDIM timestep list (decreasing k), ending at t = 0 (or tau_0)."""
        ks = torch.as_tensor(timesteps, dtype=torch.long)
        end = 0.0 if final_alpha_one else float(self.tau[0])
        return self.tau[ks].tolist() + [end]

    def __repr__(self) -> str:
        return (f"VPConvention(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
                f"t_range=[{self.t_min:.4g}, {self.t_max:.4g}])")


def convention_from_scheduler(scheduler: Any, timestep_scale: float | None = None,
                              prediction_type: str | None = None) -> FlowConvention | VPConvention:
    """The convention of a diffusers scheduler instance (flow matching by class name, else VP by alphas_cumprod).

    Args:
        scheduler: A diffusers scheduler.
        timestep_scale: Flow models: model timestep per unit t (default num_train_timesteps).
        prediction_type: VP models: override of the scheduler's prediction type.

    Returns:
        A :class:`FlowConvention` or :class:`VPConvention`.

    Raises:
        ValueError: when the scheduler is neither a flow-matching scheduler nor has ``alphas_cumprod``.
    """
    name = type(scheduler).__name__
    cfg = scheduler.config
    if name.startswith("FlowMatch"):
        if cfg.get("use_dynamic_shifting", False):
            shift = 1.0  # resolution dependent: grid() then ignores it; read scheduler.sigmas after set_timesteps(mu=)
        else:
            shift = float(cfg.get("shift", 1.0))
        scale = float(cfg.get("num_train_timesteps", 1000)) if timestep_scale is None else float(timestep_scale)
        return FlowConvention(scale, shift)
    ab = getattr(scheduler, "alphas_cumprod", None)
    if ab is None:
        raise ValueError(f"scheduler {name} is neither a flow-matching scheduler nor a discrete VP schedule "
                         "(no alphas_cumprod); fewstep cannot map its time convention")
    pred = prediction_type or cfg.get("prediction_type", "epsilon")
    return VPConvention(torch.as_tensor(ab), pred)
