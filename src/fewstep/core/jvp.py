r"""Jacobian-vector products as one shared service for every JVP-based method.

For a function :math:`y = f(p_1, \dots, p_n)` and tangents :math:`(\dot p_1, \dots, \dot p_n)`,
:func:`jvp` returns :math:`(f(p), \sum_i \partial_{p_i} f(p)\,\dot p_i)`. MeanFlow, sCM, FACM and AYF use it
for the total time derivative of the student along the probability-flow ODE,
:math:`\tfrac{d}{dt}F(x_t, t, s) = \partial_x F\, v + \partial_t F` (tangent (v, 1, 0) on (x, t, s)).

Three interchangeable modes:

* ``func``: exact forward-mode AD with :func:`torch.func.jvp` on the bare module (a DDP-style wrapper's
  ``.module`` is unwrapped: functorch cannot trace the wrapper, pytorch#102197).
* ``fd``: central finite differences :math:`(f(p + \epsilon\dot p) - f(p - \epsilon\dot p)) / 2\epsilon`
  (truncation error :math:`\epsilon^2 |f'''|/6`, round-off :math:`\sim u|f|/\epsilon`); works for any black box, e.g.
  an ODE solve. Choose eps for the function at hand: a sinusoidal time embedding with frequency
  :math:`\omega` has :math:`|f'''| \sim \omega^3` (the default MLP: :math:`\omega = 2\pi\cdot 32`), which needs
  eps ~ 1e-6 in float64; float32 fd is only a coarse fallback.
* ``autograd``: the double-backward trick. With :math:`g(u) = J^\top u` (a vector-Jacobian product that is
  linear in a dummy :math:`u`), :math:`J\dot p = \partial_u \langle g(u), \dot p\rangle`; needs only
  reverse-mode AD, so it works for layers without forward-mode rules.

Scaled-dot-product attention has no forward-mode rule for its fused kernels, so every JVP runs inside
:func:`math_attention`, which selects the math backend.

Gradients and distributed training: by default the JVP runs under ``torch.no_grad`` and returns detached
tensors (the stop-gradient target of every method here); methods compute their prediction with a separate
ordinary forward pass. The JVP therefore never enters the autograd graph, and the explicit gradient
all-reduce after ``backward()`` (see docs/architecture.md) sees exactly the gradients of that forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["JVP_MODES", "jvp", "math_attention", "unwrap_module"]

JVP_MODES: tuple[str, ...] = ("func", "fd", "autograd")


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Context manager forcing ``scaled_dot_product_attention`` onto the math backend (JVP-safe)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def unwrap_module(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Return ``fn.module`` for a DDP-style wrapper (an nn.Module holding an nn.Module in ``.module``), else fn."""
    inner = getattr(fn, "module", None)
    if isinstance(fn, nn.Module) and isinstance(inner, nn.Module):
        return inner
    return fn


def _check(primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> None:
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal; got {len(primals)} primals and {len(tangents)} tangents")
    for i, (p, v) in enumerate(zip(primals, tangents)):
        if not (torch.is_tensor(p) and torch.is_tensor(v)):
            raise TypeError(f"primal and tangent {i} must be tensors; got {type(p).__name__}, {type(v).__name__}")
        if p.shape != v.shape:
            raise ValueError(f"tangent {i} must have the primal's shape {tuple(p.shape)}; got {tuple(v.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"primal {i} must be a floating-point tensor; got {p.dtype}")


def _jvp_fd(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
            eps: float) -> tuple[Tensor, Tensor]:
    r"""Central differences :math:`(f(p+\epsilon\dot p) - f(p-\epsilon\dot p))/(2\epsilon)`, plus :math:`f(p)`."""
    out = fn(*primals)
    plus = fn(*[p + eps * v.to(p.dtype) for p, v in zip(primals, tangents)])
    minus = fn(*[p - eps * v.to(p.dtype) for p, v in zip(primals, tangents)])
    return out, (plus - minus) / (2.0 * eps)


def _jvp_autograd(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
                  create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""Double backward: :math:`J\dot p = \nabla_u \langle J^\top u, \dot p\rangle` with a dummy cotangent u."""
    with torch.enable_grad():
        ps = [p.detach().requires_grad_(True) if not p.requires_grad else p for p in primals]
        out = fn(*ps)
        u = torch.zeros_like(out, requires_grad=True)
        vjps = torch.autograd.grad(out, ps, grad_outputs=u, create_graph=True, allow_unused=True)
        dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(vjps, tangents) if g is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:  # output does not depend on the primals
            return out, torch.zeros_like(out)
        (tan,) = torch.autograd.grad(dot, u, create_graph=create_graph)
    return out, tan


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], mode: str = "func",
        eps: float = 1e-3, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    r"""Evaluate :math:`f(p)` and the Jacobian-vector product :math:`\sum_i \partial_{p_i} f(p)\,\dot p_i`.

    Args:
        fn: A function or module of the primals returning one tensor (a DDP-style wrapper is unwrapped).
        primals: Input tensors :math:`p_i`, e.g. (x_t, t, s).
        tangents: Tangents :math:`\dot p_i` of the same shapes, e.g. (v, 1, 0).
        mode: ``func`` (torch.func.jvp), ``fd`` (central finite differences) or ``autograd`` (double backward).
        eps: Finite-difference step of ``fd`` mode (the inputs move by eps times the tangent; keep times
            inside the network's valid range).
        create_graph: If False (default) the JVP runs under ``no_grad`` and both outputs are detached (the
            stop-gradient target). If True the outputs stay differentiable with respect to parameters.

    Returns:
        ``(out, tangent_out)``, both of the output's shape.

    Raises:
        ValueError: for an unknown mode, a non-positive eps, or tangents whose shapes do not match.
    """
    if mode not in JVP_MODES:
        raise ValueError(f"unknown jvp mode {mode!r}; expected one of {JVP_MODES}")
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")
    primals, tangents = tuple(primals), tuple(tangents)
    _check(primals, tangents)
    f = unwrap_module(fn)
    grad_ctx = contextlib.nullcontext() if create_graph else torch.no_grad()
    with math_attention():
        if mode == "autograd":
            out, tan = _jvp_autograd(f, primals, tangents, create_graph)
            if not create_graph:
                out, tan = out.detach(), tan.detach()
            return out, tan
        with grad_ctx:
            if mode == "func":
                tangents = tuple(v.to(p.dtype) for p, v in zip(primals, tangents))
                return torch.func.jvp(f, primals, tangents)
            return _jvp_fd(f, primals, tangents, eps)
