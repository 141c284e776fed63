r"""Log-densities of flow-map samples through jumps: the discrete change of variables.

:math:`\log q_s(f_{t\to s}(x)) = \log q_t(x) - \log|\det \partial f_{t\to s}/\partial x|`, exact per row in low
dimension (one Jacobian per sample). Chaining k jumps from :math:`x_1 \sim N(0, I)` gives the log-density of a
k-jump sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.sampling.samplers import check_grid, time_grid

__all__ = ["jump_logdet", "flowmap_logdensity"]


def jump_logdet(flowmap: Callable[..., Tensor], x: Tensor, t: Tensor | float, s: Tensor | float,
                cond: Tensor | None = None, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    r"""One jump :math:`y = f_{t\to s}(x)` and :math:`\log|\det \partial f_{t\to s}/\partial x|` per row (exact).

    The per-row Jacobians come from ``torch.func.jacrev`` (vmapped vector-Jacobian products) of
    :math:`X \mapsto \sum_b f(X)_b`, valid because rows do not interact; then ``slogdet``. Costs d backward
    passes: use in low dimension.

    Args:
        flowmap: ``f(x, t, s, cond=None)``.
        x: Points, shape (batch, ...).
        t: Start time, scalar or (batch,).
        s: End time, scalar or (batch,).
        cond: Optional labels.
        create_graph: Keep the graph (results differentiable w.r.t. parameters).

    Returns:
        (y, logabsdet) with logabsdet of shape (batch,).
    """
    b, d = x.shape[0], x[0].numel()
    # pass times as tensors of x's dtype: a Python float would be rounded through float32 by utils.as_time
    t = t if torch.is_tensor(t) else torch.full((b,), float(t), dtype=x.dtype, device=x.device)
    s = s if torch.is_tensor(s) else torch.full((b,), float(s), dtype=x.dtype, device=x.device)

    def summed(xx: Tensor) -> tuple[Tensor, Tensor]:
        y = flowmap(xx, t, s, cond=cond)
        if y.shape != xx.shape:
            raise ValueError(f"flow map output must have the shape of x {tuple(xx.shape)}; got {tuple(y.shape)}")
        return y.sum(0), y

    xin = x if create_graph else x.detach()
    with torch.enable_grad():
        jac, y = torch.func.jacrev(summed, has_aux=True)(xin)
    jac = jac.reshape(d, b, d).permute(1, 0, 2)  # (B, d_out, d_in)
    _, logabsdet = torch.linalg.slogdet(jac)
    if not create_graph:
        y, logabsdet = y.detach(), logabsdet.detach()
    return y, logabsdet


def flowmap_logdensity(flowmap: Callable[..., Tensor], x1: Tensor, grid: Tensor | list[float] | int = 1,
                       cond: Tensor | None = None, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    r"""Chain jumps from noise: :math:`\log q_{t_{i+1}}(f(x)) = \log q_{t_i}(x) - \log|\det \partial f/\partial x|`.

    Args:
        flowmap: ``f(x, t, s, cond=None)``.
        x1: Noise at grid[0] = 1, shape (batch, ...), with :math:`\log q_1 = \log\mathcal N(0, I)`.
        grid: Decreasing times from 1, or an int n for the uniform n-jump grid to 0.
        cond: Optional labels.
        create_graph: Keep the graph.

    Returns:
        (x, log_q): the samples at grid[-1] and their log-density, shape (batch,).
    """
    g = time_grid(grid) if isinstance(grid, int) else check_grid(grid, order="monotone")
    if float(g[0]) != 1.0 or not bool((g[1:] < g[:-1]).all()):
        raise ValueError(f"flow-map sampling needs a decreasing grid starting at t=1; got {g.tolist()}")
    from fewstep.sampling.logdensity import standard_normal_logprob  # logdensity re-exports this module

    x, log_q = x1, standard_normal_logprob(x1)
    for i in range(len(g) - 1):
        x, ld = jump_logdet(flowmap, x, float(g[i]), float(g[i + 1]), cond=cond, create_graph=create_graph)
        log_q = log_q - ld
    return x, log_q
