r"""A method's own multi-step sampler: deterministic jumps or CTM gamma-sampling, on a named grid.

Every :class:`~fewstep.methods.base.Method` declares ``sampler: SamplerSpec``; the run folder stores it (resolved
``config.yaml``, section ``sampler``) and ``fewstep sample``, ``fewstep eval``, the trainer's eval callback, the
demo and the benchmarks all draw samples through :func:`sample_with`, so a student is sampled the way it was trained.

With grid :math:`1 = t_0 > t_1 > \dots > t_K = 0` and :math:`\eta = t/(1-t)`, one step from :math:`t_i` is

.. math::
    x \leftarrow f_{t_i \to u}(x),\quad \eta_u = \sqrt{1-\gamma^2}\,\eta_{t_{i+1}},\quad
    x \leftarrow \tfrac{1-t_{i+1}}{1-u}x + \sqrt{t_{i+1}^2 - (\tfrac{1-t_{i+1}}{1-u}u)^2}\,z

(:func:`fewstep.sampling.samplers.gamma_sample`). :math:`\gamma = 0` is deterministic flow-map sampling
:math:`x_{t_{i+1}} = f_{t_i \to t_{i+1}}(x_{t_i})`; :math:`\gamma = 1` jumps to data and re-noises with fresh noise
(multi-step consistency sampling, Song et al. 2023, "Consistency Models", Alg. 1; Kim et al. 2024, CTM).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.sampling.samplers import SampleResult, check_grid, gamma_sample, sample_flowmap, time_grid

__all__ = [
    "RENOISE_SEED_OFFSET",
    "SamplerSpec",
    "GRID_KINDS",
    "DETERMINISTIC",
    "CONSISTENCY",
    "sample_with",
    "resolve_grid",
]

GRID_KINDS: tuple[str, ...] = ("uniform", "edm")


@dataclass(frozen=True)
class SamplerSpec:
    """How a flow-map student takes K > 1 steps.

    Attributes:
        gamma: CTM gamma in [0, 1]: 0 = deterministic jumps, 1 = jump to data and re-noise with fresh noise.
        grid: Grid rule for K steps from 1 to 0: ``uniform`` (t_i = 1 - i/K) or ``edm`` (EDM rho=7 spacing).
    """

    gamma: float = 0.0
    grid: str = "uniform"

    def __post_init__(self) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0.0 <= g <= 1.0:
            raise ValueError(f"sampler gamma must be a number in [0, 1]; got {g!r}")
        if self.grid not in GRID_KINDS:
            raise ValueError(f"sampler grid must be one of {GRID_KINDS}; got {self.grid!r}")

    @property
    def stochastic(self) -> bool:
        """True when steps re-noise (gamma > 0), i.e. samples need a generator."""
        return self.gamma > 0.0

    def times(self, nfe: int) -> Tensor:
        """The K = ``nfe`` step grid of this rule (float64, from 1 to 0)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"the number of sampling steps (NFE) must be an int >= 1; got {nfe!r}")
        return time_grid(nfe, kind=self.grid)

    def describe(self) -> str:
        """One line, e.g. ``gamma=1 (jump to data, fresh noise), uniform grid``."""
        kind = "deterministic jumps" if self.gamma == 0 else (
            "jump to data, fresh noise" if self.gamma == 1 else "partial re-noising")
        return f"gamma={self.gamma:g} ({kind}), {self.grid} grid"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for config.yaml / JSON."""
        return asdict(self)


DETERMINISTIC = SamplerSpec()
CONSISTENCY = SamplerSpec(gamma=1.0)


def resolve_grid(spec: SamplerSpec, nfe: int | None = None, grid: Any = None,
                 allow_nonzero_end: bool = False) -> Tensor:
    """The time grid: an explicit decreasing ``grid`` (checked) or ``spec.times(nfe)``.

    An explicit grid must start at 1 and end at 0 unless ``allow_nonzero_end`` (a grid that stops early returns
    noisy samples x_{t_K}, not data).
    """
    if grid is None:
        return spec.times(1 if nfe is None else nfe)
    g = check_grid(grid)
    if not allow_nonzero_end and float(g[-1]) != 0.0:
        raise ValueError(f"the sampling grid ends at t={float(g[-1]):g}, not 0, so it would return noisy samples; "
                         "end it at 0 (or pass --allow-partial to mean it)")
    return g


#: Re-noising draws of stochastic (gamma > 0) samplers use seed + this offset: with the noise's own seed their first
#: draw would equal x_1 itself, turning "fresh noise" at the first re-noising into the initial noise.
RENOISE_SEED_OFFSET = 104_729


@torch.no_grad()
def sample_with(flowmap: Callable[..., Tensor], x1: Tensor, spec: SamplerSpec, nfe: int | None = None,
                grid: Any = None, cond: Tensor | None = None, seed: int = 0,
                generator: torch.Generator | None = None, return_trajectory: bool = False,
                allow_nonzero_end: bool = False) -> SampleResult:
    """Sample ``flowmap`` from noise ``x1`` with ``spec`` on ``grid`` (or ``spec.times(nfe)``); one NFE per step.

    The re-noising draws (gamma > 0) come from ``generator`` or a CPU generator seeded with
    ``seed + RENOISE_SEED_OFFSET``: callers draw x_1 with ``seed`` itself, and a generator with the same seed
    would make the first "fresh" noise equal x_1.
    """
    g = resolve_grid(spec, nfe, grid, allow_nonzero_end)
    if not spec.stochastic:
        return sample_flowmap(flowmap, x1, g, cond=cond, return_trajectory=return_trajectory)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed) + RENOISE_SEED_OFFSET)
    return gamma_sample(flowmap, x1, g, gamma=float(spec.gamma), cond=cond, generator=gen,
                        return_trajectory=return_trajectory)
