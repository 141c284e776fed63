r"""PeRFlow (piecewise rectified flow, Yan et al. 2024; docs/methods.md §3) with optional marginal alignment per window.

Windows :math:`1 = t_0 > t_1 > \dots > t_K = 0` (uniform, or a given list). Per example a window k is drawn,
its start :math:`x_{t_k}` is either data noised to :math:`t_k` (``window_input: data``; the true marginal
:math:`p_{t_k}`, exact teacher samples for an analytic teacher) or the teacher ODE solved from noise
(``window_input: teacher``, data-free). The teacher solves the window,
:math:`x_{t_{k+1}} = \mathrm{ODE}_T(x_{t_k}; t_k \to t_{k+1})` with ``solve_steps`` steps, and the student
regresses the constant window velocity at linearly interpolated points:

.. math::
    L = E\Big\|v_\theta(x_t, t, c) - \frac{x_{t_k} - x_{t_{k+1}}}{t_k - t_{k+1}}\Big\|^2
        + \lambda L_{MA}([t_{k+1}, t_k]),\qquad
    x_t = x_{t_k} + \frac{t - t_k}{t_{k+1} - t_k}(x_{t_{k+1}} - x_{t_k}),\ t \sim U(t_{k+1}, t_k).

:math:`L_{MA}` (:mod:`fewstep.methods._shared.alignment`) has the gradient of
:math:`KL(\Phi_k\#p_{t_k}\,\|\,p_{t_{k+1}})` for the student's window map :math:`\Phi_k`, aligned at the exact
window end :math:`t_{k+1}` of every window (the last one, ending at 0, against the teacher's data marginal smoothed
by :math:`\mathcal N(0, (\varepsilon/(1-\varepsilon))^2 I)`, :math:`\varepsilon` = ``ma_t_min``). By default
(``ma_mode: ode``) :math:`\Phi_k` is the velocity student's ODE over the window with its log-density tracked along
it; an ``average_velocity`` student has no trained instantaneous velocity and needs ``ma_mode: jump`` (its window
jump :math:`F(x, t_k, t_{k+1})`, valid only where it does not fold). Summed over windows these are the local terms
of the telescoping bound TV(q_0, p_0) <= sum_k eps_k (docs/methods.md §5).

Student parameterization. The regression target is :math:`F_\theta(x_t, t, t_{k+1})`, i.e. the flow map
:math:`f_{t\to t_{k+1}}(x_t) = x_t - (t - t_{k+1})F_\theta` lands on the window end from every point of the chord.
For a ``velocity`` student (classic PeRFlow, the method's default) F ignores the window end; in continuous
time the two windows that share a boundary :math:`t_k` then ask for different velocities at the same time
(the chord of window k-1 as t -> t_k from above, that of window k at t_k), so a smooth network blends them at
exactly the time it is evaluated at inference (measured in docs/results/reflow.md). An ``average_velocity``
student sees the window end as its second time and has no such ambiguity; both sample identically below.

Inference is one step per window: for a velocity-parameterized student,
``sample_flowmap(student, x1, window_grid)`` takes exactly the Euler jump
:math:`x_{t_{k+1}} = x_{t_k} - (t_k - t_{k+1})v_\theta(x_{t_k}, t_k)`, which is the teacher's window map
when :math:`v_\theta` equals the constant window velocity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewstep.core.paths import LinearPath
from fewstep.core.utils import bcast, set_unregistered
from fewstep.methods._shared.reflow_family import MAOptions, add_ma, ma_term
from fewstep.methods.base import U_AUX, U_S, U_SELECT, U_T, Batch, Method
from fewstep.methods.registry import register
from fewstep.sampling.samplers import ODE_METHODS, check_grid
from fewstep.teachers.base import as_velocity_fn
from fewstep.teachers.flowmap import TeacherFlowMap

__all__ = ["PerflowConfig", "Perflow", "window_grid", "window_targets"]

WINDOW_INPUTS: tuple[str, ...] = ("data", "teacher")
SECOND_TIMES: tuple[str, ...] = ("window_end", "in_window")


@dataclass
class PerflowConfig(MAOptions):
    """PeRFlow hyper-parameters (plus the MA options of :class:`~fewstep.methods._shared.reflow_family.MAOptions`).

    Attributes:
        num_windows: K uniform windows (ignored when ``windows`` is given).
        windows: Explicit decreasing window boundaries from 1 to 0, e.g. [1, 0.6, 0.3, 0].
        window_input: ``data`` (data noised to t_k) or ``teacher`` (teacher ODE from noise, data-free).
        solver: Teacher solver inside a window (euler/heun/rk4).
        solve_steps: Teacher steps per window.
        input_steps: Teacher steps of the solve from 1 to t_k for ``window_input: teacher``.
        second_time: Second time s of a flow-map (``average_velocity``) student's regression F(x_t, t, s):
            ``window_end`` (s = t_{k+1}: only whole-window jumps are trained) or ``in_window``
            (s ~ U(t_{k+1}, t): every jump along the window's chord, so K sub-steps per window sample it too).
            A ``velocity`` student ignores s.
        end_fraction: With ``in_window``, the fraction of rows that keep s = t_{k+1} (the whole-window jump, the
            one a sampler with one step per window takes).
    """

    num_windows: int = 4
    windows: list = field(default_factory=list)
    window_input: str = "data"
    solver: str = "rk4"
    solve_steps: int = 2
    input_steps: int = 16
    second_time: str = "window_end"
    end_fraction: float = 0.0


def window_grid(num_windows: int = 4, windows: list | tuple | Tensor | None = None) -> Tensor:
    """The window boundaries as a float64 tensor [1, ..., 0] (validated)."""
    if windows is not None and len(windows):
        g = check_grid(windows)
        if float(g[0]) != 1.0 or float(g[-1]) != 0.0:
            raise ValueError(f"PeRFlow windows must run from 1 to 0; got {g.tolist()}")
        return g
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1; got {num_windows}")
    return torch.linspace(1.0, 0.0, num_windows + 1, dtype=torch.float64)


def window_targets(x_s: Tensor, x_e: Tensor, t_s: Tensor, t_e: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Interpolated point, its time and the constant window velocity.

    :math:`t = t_s + u (t_e - t_s)`, :math:`x_t = x_s + u (x_e - x_s)`, target :math:`(x_s - x_e)/(t_s - t_e)`.

    Args:
        x_s: Window-start points, shape (B, ...).
        x_e: Window-end points (``x_s`` solved from ``t_s`` to ``t_e``), same shape.
        t_s: Window start times, shape (B,).
        t_e: Window end times, shape (B,).
        u: Uniforms in [0, 1] placing the point inside the window, shape (B,).

    Returns:
        (x_t, t, target).
    """
    t = t_s + u * (t_e - t_s)
    x_t = x_s + bcast(u, x_s) * (x_e - x_s)
    return x_t, t, (x_s - x_e) / bcast(t_s - t_e, x_s)


@register
class Perflow(Method):
    """Piecewise rectified flow: K windows, teacher-solved window targets, one student step per window."""

    name = "perflow"
    description = "PeRFlow: piecewise reflow over K windows (+ per-window marginal-alignment KL with ma_weight>0)."
    config_class = PerflowConfig
    parameterization = "velocity"
    needs_teacher = True
    needs_data = False

    def __init__(self, student: Any, teacher: Any = None, config: Any = None) -> None:
        super().__init__(student, teacher, config)
        cfg = self.config
        cfg.check_ma()
        if cfg.window_input not in WINDOW_INPUTS:
            raise ValueError(f"unknown window_input {cfg.window_input!r}; expected one of {WINDOW_INPUTS}")
        if cfg.second_time not in SECOND_TIMES:
            raise ValueError(f"unknown second_time {cfg.second_time!r}; expected one of {SECOND_TIMES}")
        if not 0.0 <= cfg.end_fraction <= 1.0:
            raise ValueError(f"end_fraction must lie in [0, 1]; got {cfg.end_fraction}")
        if cfg.solver not in ODE_METHODS:
            raise ValueError(f"unknown PeRFlow solver {cfg.solver!r}; expected one of {ODE_METHODS}")
        if cfg.solve_steps < 1 or cfg.input_steps < 1:
            raise ValueError(f"solve_steps and input_steps must be >= 1; got {cfg.solve_steps}, {cfg.input_steps}")
        self.grid = window_grid(cfg.num_windows, cfg.windows)
        par = getattr(student, "parameterization", "velocity")
        if cfg.ma_weight > 0 and cfg.ma_mode != "jump" and par != "velocity":
            raise ValueError(f"perflow MA with a {par!r} student aligns its window jumps: set ma_mode='jump' "
                             f"(ma_mode={cfg.ma_mode!r} integrates an instantaneous velocity it is never trained on)")
        v_fn = as_velocity_fn(teacher, cfg.guidance)
        set_unregistered(self, "window_map", TeacherFlowMap(v_fn, method=cfg.solver, steps=cfg.solve_steps))
        set_unregistered(self, "input_map", TeacherFlowMap(v_fn, method=cfg.solver, steps=cfg.input_steps))

    @classmethod
    def uses_data(cls, config: PerflowConfig) -> bool:
        """Data batches are needed for ``window_input="data"`` (window starts are data noised to t_k)."""
        return config.window_input == "data"

    def window_starts(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Per-row window (t_k, t_{k+1}) from ``u[:, 2]`` and the start point x_{t_k}."""
        x1, dt = batch.x1, batch.x1.dtype
        k_count = len(self.grid) - 1
        k = (batch.u[:, U_SELECT] * k_count).long().clamp(0, k_count - 1).cpu()
        t_s = self.grid[k].to(x1.device, dt)
        t_e = self.grid[k + 1].to(x1.device, dt)
        cond = batch.cond
        if self.config.window_input == "data":
            if batch.x0 is None:
                raise ValueError("perflow with window_input='data' needs data batches (x0)")
            x_s = LinearPath().interpolate(batch.x0, x1, t_s)
        else:
            with torch.no_grad():
                x_s = self.input_map(x1, torch.ones_like(t_s), t_s, cond)
        return x_s, t_s, t_e, cond

    def window_velocity(self, x: Tensor, t: Tensor, t_e: Tensor, cond: Tensor | None) -> Tensor:
        """The student's prediction of the window velocity: F(x, t, t_e) (= v(x, t) for a velocity student)."""
        if hasattr(self.student, "F"):
            return self.student.F(x, t, t_e, cond)
        return self.student.velocity(x, t, cond)

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        x_s, t_s, t_e, cond = self.window_starts(batch)
        with torch.no_grad():
            x_e = self.window_map(x_s, t_s, t_e, cond)
        x_t, t, target = window_targets(x_s, x_e, t_s, t_e, batch.u[:, U_T])
        # The chord is straight, so every jump along it (from t to any s in [t_e, t]) has the window velocity.
        s = t_e
        if self.config.second_time == "in_window":
            s = torch.where(batch.u[:, U_AUX] < self.config.end_fraction, t_e, t_e + batch.u[:, U_S] * (t - t_e))
        loss = ((self.window_velocity(x_t, t, s, cond) - target) ** 2).mean()
        logs = {"loss_window": float(loss.detach())}
        return add_ma(loss, logs, ma_term(self.student, self.teacher, self.config, x_s, t_s, t_e, cond, step))
