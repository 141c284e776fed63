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

Grid rules for K steps (:func:`grid_times`): ``uniform`` :math:`t_i = 1 - i/K`; ``edm`` (EDM's rho = 7 spacing of
:math:`\eta`, later intermediate times: K = 2 gives t_1 ≈ 0.89); ``power:<p>`` :math:`t_i = (1 - i/K)^p` (p > 1
moves the intermediate times towards data: ``power:2`` is (1, 0.25, 0) at K = 2 and (1, 0.5625, 0.25, 0.0625, 0) at
K = 4; p = 1 is ``uniform``). The intermediate times are a free choice of a few-step sampler (Song et al. 2023 tune
them per model); a rule is the same for every K, so it is set once per method, not per NFE.
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
    "grid_times",
    "check_grid_rule",
    "grid_rule_problem",
    "is_grid_rule",
]

#: Grid rule names; ``power`` takes its exponent in the rule, ``power:<p>``.
GRID_KINDS: tuple[str, ...] = ("uniform", "edm", "power")
GRID_RULES_HELP = "one of 'uniform', 'edm', 'power:<p>' (p > 0: t_i = (1 - i/K)^p)"


def _parse_rule(rule: Any) -> tuple[str, float | None] | str:
    """(kind, exponent) of a grid rule, or what is wrong with it (``"must be ..."``)."""
    if not isinstance(rule, str):
        return f"must be {GRID_RULES_HELP}"
    kind, sep, arg = rule.partition(":")
    if kind in ("uniform", "edm") and not sep:
        return kind, None
    if kind != "power":
        return f"must be {GRID_RULES_HELP}"
    try:
        p = float(arg)
    except ValueError:
        p = math.nan
    if sep and math.isfinite(p) and p > 0:
        return kind, p
    return "must be 'power:<p>' with a finite exponent p > 0, e.g. 'power:2' (t_i = (1 - i/K)^p)"


def grid_rule_problem(rule: Any) -> str | None:
    """None for a valid grid rule (``uniform``, ``edm``, ``power:<p>``), else what is wrong (``"must be ..."``)."""
    parsed = _parse_rule(rule)
    return parsed if isinstance(parsed, str) else None


def _parsed(rule: Any, what: str) -> tuple[str, float | None]:
    """(kind, exponent) of a valid grid rule, else ValueError ``"<what> must be ...; got ..."``."""
    parsed = _parse_rule(rule)
    if isinstance(parsed, str):
        raise ValueError(f"{what} {parsed}; got {rule!r}")
    return parsed


def check_grid_rule(rule: Any, what: str = "sampler grid") -> str:
    """``rule`` if it is a valid grid rule, else ValueError ``"<what> must be ...; got ..."`` (one line).

    Args:
        rule: The rule, e.g. ``uniform``, ``edm``, ``power:2``.
        what: How the error names the value (a CLI option, a field).

    Returns:
        The rule, unchanged.

    Raises:
        ValueError: ``rule`` is not a grid rule.
    """
    _parsed(rule, what)
    return rule


def is_grid_rule(text: str) -> bool:
    """True when ``text`` names a grid rule (``uniform``, ``edm``, ``power:<p>``), not a list of times."""
    return text.partition(":")[0] in GRID_KINDS


def grid_times(rule: str, nfe: int) -> Tensor:
    """The K = ``nfe`` step grid of ``rule`` (float64, from 1 to 0; see the module docstring).

    Args:
        rule: A grid rule (:func:`check_grid_rule`).
        nfe: Number of steps K >= 1.

    Returns:
        The decreasing grid, shape (nfe + 1,), exactly 1 first and 0 last.
    """
    kind, p = _parsed(rule, "sampler grid")
    if kind == "power":
        return time_grid(nfe, kind="uniform") ** p
    return time_grid(nfe, kind=kind)


@dataclass(frozen=True)
class SamplerSpec:
    """How a flow-map student takes K > 1 steps.

    Attributes:
        gamma: CTM gamma in [0, 1]: 0 = deterministic jumps, 1 = jump to data and re-noise with fresh noise.
        grid: Grid rule for K steps from 1 to 0: ``uniform`` (t_i = 1 - i/K), ``edm`` (EDM rho=7 spacing) or
            ``power:<p>`` (t_i = (1 - i/K)^p).
    """

    gamma: float = 0.0
    grid: str = "uniform"

    def __post_init__(self) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0.0 <= g <= 1.0:
            raise ValueError(f"sampler gamma must be a number in [0, 1]; got {g!r}")
        check_grid_rule(self.grid)

    @property
    def stochastic(self) -> bool:
        """True when steps re-noise (gamma > 0), i.e. samples need a generator."""
        return self.gamma > 0.0

    def times(self, nfe: int) -> Tensor:
        """The K = ``nfe`` step grid of this rule (float64, from 1 to 0)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"the number of sampling steps (NFE) must be an int >= 1; got {nfe!r}")
        return grid_times(self.grid, nfe)

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
