r"""Log-densities of flow-map samples through jumps: the discrete change of variables, and fold detection.

For an injective map :math:`f = f_{t\to s}`,
:math:`\log q_s(f(x)) = \log q_t(x) - \log|\det \partial f/\partial x|`, exact per row in low dimension (one
Jacobian per sample). Chaining k jumps from :math:`x_1 \sim N(0, I)` gives the log-density of a k-jump sampler.

Folds. The formula holds only where f is injective: at a point y with several preimages :math:`x_j` the true
density is :math:`q_s(y) = \sum_j q_t(x_j)/|\det \partial f(x_j)|`, and the one-preimage value above
underestimates it. A learned jump need not be injective. Every jump therefore also reports
:math:`\operatorname{sign}\det \partial f/\partial x` per row. A flow map is orientation preserving
(:math:`f_{t\to t} = \mathrm{id}` has det 1, and the exact flow of an ODE has
:math:`\det = \exp\int\nabla\!\cdot v > 0`), so a row with :math:`\det \le 0` is *folded*: a sample set with
both signs proves that a continuous map is not injective (the local degree of an injective map is constant), and
a map with :math:`\det < 0` everywhere is not the flow of any ODE. :attr:`JumpLogDet.fold_fraction` is the share
of folded rows; the KL/TV of :mod:`fewstep.evaluation.divergences` refuse the change-of-variables density when
it is above 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewstep.core.utils import standard_normal_logprob
from fewstep.sampling.samplers import check_grid, time_grid

__all__ = ["JumpLogDet", "FlowMapLogDensity", "jump_logdet", "flowmap_logdensity", "fold_fraction"]


def fold_fraction(sign: Tensor) -> float:
    r"""Share of rows whose Jacobian determinant is not positive (:math:`\operatorname{sign}\det \le 0`)."""
    return float((sign <= 0).to(torch.float64).mean()) if sign.numel() else 0.0


@dataclass
class JumpLogDet:
    """One jump with its log-determinant and orientation.

    Unpacks as ``y, logabsdet = jump_logdet(...)`` (the two-tuple of earlier versions); the sign is an attribute.

    Attributes:
        y: :math:`f_{t\\to s}(x)`, shaped like x.
        logabsdet: :math:`\\log|\\det \\partial f/\\partial x|` per row, shape (batch,).
        sign: :math:`\\operatorname{sign}\\det \\partial f/\\partial x` per row (+1, -1, or 0 when singular).
    """

    y: Tensor
    logabsdet: Tensor
    sign: Tensor = field(repr=False)

    def __iter__(self) -> Iterator[Tensor]:
        """Iterate (y, logabsdet), so that two-name unpacking keeps working.

        Returns:
            An iterator over ``(y, logabsdet)``.
        """
        return iter((self.y, self.logabsdet))

    @property
    def fold_fraction(self) -> float:
        """Share of rows with det <= 0 (see the module docstring)."""
        return fold_fraction(self.sign)


@dataclass
class FlowMapLogDensity:
    """Samples of a chain of jumps from noise with their change-of-variables log-density and fold record.

    Unpacks as ``x, log_q = flowmap_logdensity(...)``.

    Attributes:
        x: Samples at the last grid time.
        log_q: :math:`\\log N(x_1) - \\sum_i \\log|\\det \\partial f_i/\\partial x|` per row; the log-density of the
            samples only when no jump folds (:attr:`fold_fraction` = 0).
        sign: Sign of the determinant of the whole chain's Jacobian per row (product over jumps).
        folded: Per row, True when some jump has det <= 0 there.
        jump_fold_fractions: :func:`fold_fraction` of each jump.
    """

    x: Tensor
    log_q: Tensor
    sign: Tensor = field(repr=False)
    folded: Tensor = field(repr=False)
    jump_fold_fractions: list[float] = field(default_factory=list)

    def __iter__(self) -> Iterator[Tensor]:
        """Iterate (x, log_q), so that two-name unpacking keeps working.

        Returns:
            An iterator over ``(x, log_q)``.
        """
        return iter((self.x, self.log_q))

    @property
    def fold_fraction(self) -> float:
        """Share of rows folded by at least one jump."""
        return float(self.folded.to(torch.float64).mean()) if self.folded.numel() else 0.0


def jump_logdet(
    flowmap: Callable[..., Tensor],
    x: Tensor,
    t: Tensor | float,
    s: Tensor | float,
    cond: Tensor | None = None,
    create_graph: bool = False,
) -> JumpLogDet:
    r"""One jump :math:`y = f_{t\to s}(x)`, :math:`\log|\det \partial f_{t\to s}/\partial x|` and its sign per row.

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
        A :class:`JumpLogDet` (unpacks as ``y, logabsdet``; ``.sign`` and ``.fold_fraction`` report folds).

    Raises:
        ValueError: If the flow map's output is not shaped like x.
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
    sign, logabsdet = torch.linalg.slogdet(jac)
    if not create_graph:
        y, logabsdet = y.detach(), logabsdet.detach()
    return JumpLogDet(y=y, logabsdet=logabsdet, sign=sign.detach())


def flowmap_logdensity(
    flowmap: Callable[..., Tensor],
    x1: Tensor,
    grid: Tensor | list[float] | int = 1,
    cond: Tensor | None = None,
    create_graph: bool = False,
) -> FlowMapLogDensity:
    r"""Chain jumps from noise: :math:`\log q_{t_{i+1}}(f(x)) = \log q_{t_i}(x) - \log|\det \partial f/\partial x|`.

    Valid as a density only when no jump folds (``result.fold_fraction == 0``, see the module docstring).

    Args:
        flowmap: ``f(x, t, s, cond=None)`` (a student, or one step of a fixed-step solver written as a flow map).
        x1: Noise at grid[0] = 1, shape (batch, ...), with :math:`\log q_1 = \log\mathcal N(0, I)`.
        grid: Decreasing times from 1, or an int n for the uniform n-jump grid to 0.
        cond: Optional labels.
        create_graph: Keep the graph.

    Returns:
        A :class:`FlowMapLogDensity` (unpacks as ``x, log_q``) with the per-row sign and fold record.

    Raises:
        ValueError: If the grid is not decreasing from t=1.
    """
    g = time_grid(grid) if isinstance(grid, int) else check_grid(grid, order="monotone")
    if float(g[0]) != 1.0 or not bool((g[1:] < g[:-1]).all()):
        raise ValueError(f"flow-map sampling needs a decreasing grid starting at t=1; got {g.tolist()}")
    x, log_q = x1, standard_normal_logprob(x1)
    sign = torch.ones(x1.shape[0], dtype=x1.dtype, device=x1.device)
    folded = torch.zeros(x1.shape[0], dtype=torch.bool, device=x1.device)
    fractions = []
    for i in range(len(g) - 1):
        j = jump_logdet(flowmap, x, float(g[i]), float(g[i + 1]), cond=cond, create_graph=create_graph)
        x, log_q = j.y, log_q - j.logabsdet
        sign, folded = sign * j.sign.to(sign.dtype), folded | (j.sign <= 0)
        fractions.append(j.fold_fraction)
    return FlowMapLogDensity(x=x, log_q=log_q, sign=sign, folded=folded, jump_fold_fractions=fractions)
