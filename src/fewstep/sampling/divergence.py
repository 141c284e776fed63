r"""Divergence of a velocity field, :math:`\nabla\!\cdot v = \mathrm{tr}\,\partial v/\partial x`, exact or Hutchinson.

``exact`` takes one autograd gradient per dimension (low dimension); ``hutchinson`` averages
:math:`z_k^\top (\partial v/\partial x) z_k` over probes :math:`z_k` with :math:`E[zz^\top] = I`
(:func:`make_probes`), each term one vector-Jacobian product. :func:`velocity_and_divergence` returns the velocity
with it from one forward pass, the right-hand side of the augmented log-density ODE of
:mod:`fewstep.sampling.logdensity` (which re-exports :func:`divergence` and :func:`make_probes`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DIVERGENCE_METHODS", "make_probes", "check_probes", "velocity_and_divergence", "divergence"]

DIVERGENCE_METHODS: tuple[str, ...] = ("exact", "hutchinson")


def make_probes(x: Tensor, k: int, generator: torch.Generator | None = None, kind: str = "rademacher") -> Tensor:
    r"""K Hutchinson probes z with :math:`E[zz^\top] = I`, shape (k, *x.shape), x's dtype and device.

    Args:
        x: A batch whose shape the probes copy.
        k: Number of probes (>= 1).
        generator: Optional CPU generator.
        kind: ``rademacher`` (entries ±1, lowest variance) or ``gaussian`` (N(0, 1)).

    Returns:
        The probes, shape (k, *x.shape).
    """
    if k < 1:
        raise ValueError(f"number of probes k must be >= 1, got {k}")
    shape = (k, *x.shape)
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    elif kind == "gaussian":
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; expected 'rademacher' or 'gaussian'")
    return z.to(device=x.device, dtype=x.dtype)


def check_probes(probes: Tensor | None, x: Tensor) -> Tensor:
    """``probes`` when they have the shape (K, *x.shape) of Hutchinson probes for ``x``; else a ValueError."""
    if probes is None:
        raise ValueError("method='hutchinson' needs probes of shape (K, *x.shape); build them with make_probes")
    if probes.dim() != x.dim() + 1 or tuple(probes.shape[1:]) != tuple(x.shape):
        raise ValueError(f"probes must have shape (K, {', '.join(map(str, x.shape))}); got {tuple(probes.shape)}")
    return probes


def velocity_and_divergence(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, method: str,
                            probes: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Velocity v = fn(x, t) and its divergence (B,), with one forward pass."""
    if method not in DIVERGENCE_METHODS:
        raise ValueError(f"unknown divergence method {method!r}; expected one of {DIVERGENCE_METHODS}")
    if method == "hutchinson":
        probes = check_probes(probes, x)
    with torch.enable_grad():
        xin = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        v = fn(xin, t)
        if v.shape != xin.shape:
            raise ValueError(f"velocity must have the shape of x {tuple(xin.shape)}; got {tuple(v.shape)}")
        vf = v.reshape(v.shape[0], -1)
        b, d = vf.shape
        if method == "exact":
            div = torch.zeros(b, dtype=v.dtype, device=v.device)
            for i in range(d):
                g = torch.autograd.grad(vf[:, i].sum(), xin, create_graph=create_graph, retain_graph=True,
                                        allow_unused=True)[0]
                if g is not None:
                    div = div + g.reshape(b, -1)[:, i]
        else:
            assert probes is not None
            est = []
            for z in probes:
                g = torch.autograd.grad(v, xin, grad_outputs=z, create_graph=create_graph, retain_graph=True,
                                        allow_unused=True)[0]
                est.append(torch.zeros(b, dtype=v.dtype, device=v.device) if g is None
                           else (g * z).reshape(b, -1).sum(1))
            div = torch.stack(est).mean(0)
    if not create_graph:
        v, div = v.detach(), div.detach()
    return v, div


def divergence(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor | float, method: str = "exact",
               probes: Tensor | None = None, create_graph: bool = False) -> Tensor:
    r"""Divergence :math:`\nabla\!\cdot v(x, t) = \mathrm{tr}\,\partial v/\partial x` per row, shape (batch,).

    ``exact`` takes one autograd gradient per dimension (use in low dimension); ``hutchinson`` returns
    :math:`\frac1K\sum_k z_k^\top(\partial v/\partial x)z_k`, each term one vector-Jacobian product, unbiased
    with variance O(1/K).

    Args:
        fn: Velocity field ``fn(x, t) -> v`` with t of shape (batch,).
        x: Points, shape (batch, ...).
        t: Time, scalar or shape (batch,).
        method: ``exact`` or ``hutchinson``.
        probes: Hutchinson probes, shape (K, *x.shape) (see :func:`make_probes`).
        create_graph: Keep the graph so the result is differentiable (w.r.t. x and parameters).

    Returns:
        The divergence per row, shape (batch,).
    """
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    tt = tt.expand(x.shape[0]) if tt.dim() == 0 else tt
    return velocity_and_divergence(fn, x, tt, method, probes, create_graph)[1]
