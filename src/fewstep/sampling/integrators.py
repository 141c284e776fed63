r"""Fixed-step explicit Runge-Kutta integration: one Butcher-tableau table and one step function.

An explicit s-stage method with tableau :math:`(c, A, b)` advances :math:`dy/dt = F(y, t)` from t to
:math:`t + h` by

.. math::
    k_j = F\Big(y + h\sum_{l<j} a_{jl} k_l,\; t + c_j h\Big),\qquad y_{t+h} = y + h \sum_j b_j k_j .

The state may be one tensor or a tuple of tensors integrated together (an augmented state such as
:math:`(x, \log q)` with :math:`d\log q/dt = -\nabla\!\cdot v`), so the samplers, the log-density solver, the
marginal-alignment window and the exact teacher flow map all use the same tableau and the same arithmetic.
Times run in either direction (sampling uses h < 0) and may differ per row.

Floating-point conventions (fixed here once): a stage with :math:`c_j = 1` is evaluated exactly at the end
time s (not at t + h, which can differ from s by one rounding); the weights are stored as integers over a
common denominator, :math:`b = w / D`, and the update is :math:`y + (h / D) \sum_j w_j k_j` (RK4:
:math:`y + \tfrac h6 (k_1 + 2k_2 + 2k_3 + k_4)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.utils import bcast

__all__ = ["ButcherTableau", "TABLEAUS", "RK_METHODS", "get_tableau", "rk_step", "State"]

State = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class ButcherTableau:
    r"""An explicit Runge-Kutta method.

    Attributes:
        name: Method name.
        order: Order of accuracy p (global error :math:`O(h^p)`).
        c: Stage times as fractions of the step, :math:`c_j`.
        a: Lower-triangular stage coefficients, row j holds :math:`a_{j0}, \dots, a_{j,j-1}`.
        weights: Integer-valued numerators :math:`w_j` of the weights :math:`b_j = w_j / D`.
        denominator: The common denominator D.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    weights: tuple[float, ...]
    denominator: float

    @property
    def b(self) -> tuple[float, ...]:
        """The weights :math:`b_j = w_j / D` (they sum to 1)."""
        return tuple(w / self.denominator for w in self.weights)

    @property
    def stages(self) -> int:
        """Number of stages (function evaluations per step)."""
        return len(self.c)


TABLEAUS: dict[str, ButcherTableau] = {
    "euler": ButcherTableau("euler", 1, (0.0,), ((),), (1.0,), 1.0),
    "heun": ButcherTableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (1.0, 1.0), 2.0),
    "rk4": ButcherTableau("rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                          (1.0, 2.0, 2.0, 1.0), 6.0),
}
RK_METHODS: tuple[str, ...] = tuple(TABLEAUS)


def get_tableau(method: str | ButcherTableau) -> ButcherTableau:
    """The tableau of ``method`` (a name from :data:`TABLEAUS` or a tableau).

    Args:
        method: A method name (``euler``, ``heun``, ``rk4``) or a :class:`ButcherTableau`, returned as is.

    Returns:
        The :class:`ButcherTableau`.

    Raises:
        ValueError: for an unknown method name.
    """
    if isinstance(method, ButcherTableau):
        return method
    if method not in TABLEAUS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {RK_METHODS}")
    return TABLEAUS[method]


def _scale(coef: float | Tensor, k: Tensor) -> Tensor:
    """coef * k with a per-row coef of shape (batch,) broadcast against k."""
    return bcast(coef, k) * k if torch.is_tensor(coef) else coef * k


def _combine(weights: tuple[float, ...], ks: list[tuple[Tensor, ...]], comp: int) -> Tensor | None:
    """sum_j w_j k_j[comp] left to right, skipping zero weights and multiplications by 1."""
    acc: Tensor | None = None
    for w, k in zip(weights, ks, strict=True):
        if w == 0.0:
            continue
        term = k[comp] if w == 1.0 else w * k[comp]
        acc = term if acc is None else acc + term
    return acc


def rk_step(fn: Callable[[State, Tensor], State], y: State, t: float | Tensor, s: float | Tensor,
            method: str | ButcherTableau = "euler") -> State:
    r"""One explicit Runge-Kutta step of :math:`dy/d\tau = F(y, \tau)` from t to s (h = s - t, any sign).

    Args:
        fn: The right-hand side ``fn(y, tau)``; ``y`` has the structure of the state (a tensor or a tuple of
            tensors) and ``tau`` is a tensor of shape (batch,) in the dtype of the first state tensor. It returns
            the derivative with the structure of the state.
        y: The state at t: a tensor of shape (batch, ...) or a tuple of such tensors (same batch).
        t: Start time, a Python float or per-row times of shape (batch,).
        s: End time, same kind as t.
        method: ``euler`` (1 stage, order 1), ``heun`` (2, order 2), ``rk4`` (4, order 4), or a tableau.

    Returns:
        The state at s, with the structure of ``y``.

    Raises:
        ValueError: for an unknown method, or when t and s are not both floats or both tensors.
    """
    tab = get_tableau(method)
    single = torch.is_tensor(y)
    ys: tuple[Tensor, ...] = (y,) if single else tuple(y)  # type: ignore[assignment,arg-type]
    if torch.is_tensor(t) != torch.is_tensor(s):
        raise ValueError("rk_step needs t and s both Python floats or both per-row tensors")
    x0 = ys[0]
    h = s - t

    def times(c: float) -> Tensor:
        tau = t if c == 0.0 else s if c == 1.0 else t + c * h
        if torch.is_tensor(tau):
            return tau
        return torch.full((x0.shape[0],), float(tau), dtype=x0.dtype, device=x0.device)

    ks: list[tuple[Tensor, ...]] = []
    for j, c in enumerate(tab.c):
        stage = ys
        for al, k in zip(tab.a[j], ks, strict=True):
            if al != 0.0:
                stage = tuple(u + _scale(al * h, kc) for u, kc in zip(stage, k, strict=True))
        out = fn(stage[0] if single else stage, times(c))
        ks.append((out,) if single else tuple(out))  # type: ignore[arg-type]
    hd = h / tab.denominator
    new = []
    for i, u in enumerate(ys):
        acc = _combine(tab.weights, ks, i)
        new.append(u if acc is None else u + _scale(hd, acc))
    return new[0] if single else tuple(new)
