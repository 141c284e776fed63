r"""Gaussian mixtures drawn at random from a seed: targets that no shipped config was tuned on.

``random_mixture(seed)`` draws, with a ``torch.Generator`` seeded by ``seed`` (float64, CPU, so the draw is the
same on every machine):

* the dimension :math:`d \sim U\{2..16\}` and the number of components :math:`K \sim U\{3..10\}` (unless given);
* unequal weights :math:`w = (u + 0.2) / \sum (u + 0.2)` with :math:`u \sim \mathrm{Dirichlet}(1_K)` realised
  as normalised Exp(1) draws (so every weight is at least :math:`0.2 / (1 + 0.2K)`, never a vanishing mode);
* means :math:`\mu_k \sim N(0, s^2 I_d)` with :math:`s = 1.25`: per coordinate about the spread of ``ring8``
  (radius 2, per-coordinate std 1.41) and ``aniso3`` (about 1);
* full covariances :math:`\Sigma_k = Q_k \mathrm{diag}(\sigma_{k1}^2..\sigma_{kd}^2) Q_k^T` with :math:`Q_k` a
  Haar-random rotation (QR of a Gaussian matrix, signs fixed by the diagonal of R) and
  :math:`\log\sigma_{kj} \sim U[\log 0.08, \log 0.5]`: the component widths of the presets (0.08-0.6).

The mixture is returned as a :class:`~fewstep.teachers.gmm.GaussianMixtureTeacher` (exact velocity, score,
log-density and samples). With ``conditional=True`` every component is its own class.

Names: ``"random:<seed>"`` is accepted wherever a preset name is (``load_preset``, ``teacher.name`` in a config,
``--teacher`` / dataset names), e.g. ``random:3`` is ``random_mixture(3)``. :func:`random_mixture_suite` is the
named set of ten such mixtures used by ``fewstep bench``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.core.paths import AffinePath
from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = [
    "random_mixture",
    "random_mixture_spec",
    "random_mixture_suite",
    "parse_random_name",
    "is_random_name",
    "RANDOM_PREFIX",
    "DIM_RANGE",
    "COMPONENT_RANGE",
    "MEAN_SCALE",
    "STD_RANGE",
]

RANDOM_PREFIX = "random:"
DIM_RANGE = (2, 16)
COMPONENT_RANGE = (3, 10)
MEAN_SCALE = 1.25
STD_RANGE = (0.08, 0.5)
_WEIGHT_FLOOR = 0.2  # added to the Dirichlet draw before renormalising


def _check_range(name: str, value: int | None, lo: int, hi: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}]; got {value!r}")


def _rotation(d: int, g: torch.Generator) -> Tensor:
    """Haar-random orthogonal matrix: Q of the QR of a Gaussian matrix, columns scaled by sign(diag R)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_mixture_spec(
    seed: int, dim: int | None = None, n_components: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The weights (K,), means (K, d) and covariances (K, d, d) of mixture ``seed`` (see the module docstring).

    Args:
        seed: Any int >= 0; the same seed always gives the same mixture.
        dim: Dimension d in [2, 16]; default drawn from the seed.
        n_components: Number of components K in [3, 10]; default drawn from the seed.

    Returns:
        (weights, means, covariances) as float64 tensors; weights sum to 1, covariances are SPD.

    Raises:
        ValueError: for a negative or non-int seed, or dim / n_components out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"random mixture seed must be an int >= 0; got {seed!r}")
    _check_range("dim", dim, *DIM_RANGE)
    _check_range("n_components", n_components, *COMPONENT_RANGE)
    g = torch.Generator().manual_seed(seed)
    d_draw = int(torch.randint(DIM_RANGE[0], DIM_RANGE[1] + 1, (1,), generator=g))
    k_draw = int(torch.randint(COMPONENT_RANGE[0], COMPONENT_RANGE[1] + 1, (1,), generator=g))
    d = d_draw if dim is None else dim
    k = k_draw if n_components is None else n_components
    e = -torch.log(torch.rand(k, generator=g, dtype=torch.float64).clamp_min(1e-300))  # Exp(1)
    w = e / e.sum() + _WEIGHT_FLOOR
    w = w / w.sum()
    means = MEAN_SCALE * torch.randn(k, d, generator=g, dtype=torch.float64)
    lo, hi = math.log(STD_RANGE[0]), math.log(STD_RANGE[1])
    stds = torch.exp(lo + (hi - lo) * torch.rand(k, d, generator=g, dtype=torch.float64))
    covs = []
    for j in range(k):
        q = _rotation(d, g)
        c = q @ torch.diag(stds[j] ** 2) @ q.T
        covs.append(0.5 * (c + c.T))
    return w, means, torch.stack(covs)


def random_mixture(
    seed: int,
    dim: int | None = None,
    n_components: int | None = None,
    conditional: bool = False,
    path: str | AffinePath = "linear",
) -> GaussianMixtureTeacher:
    """The analytic teacher of random mixture ``seed`` (:func:`random_mixture_spec`).

    Args:
        seed: Any int >= 0.
        dim: Dimension in [2, 16]; default drawn from the seed.
        n_components: Components in [3, 10]; default drawn from the seed.
        conditional: Give every component its own class (``num_classes = K``).
        path: Probability path ("linear", "cosine" or an AffinePath).

    Returns:
        A new :class:`GaussianMixtureTeacher`.
    """
    w, mu, cov = random_mixture_spec(seed, dim, n_components)
    classes = torch.arange(w.shape[0]) if conditional else None
    return GaussianMixtureTeacher(w, mu, cov, classes, path=path)


def is_random_name(name: object) -> bool:
    """Whether ``name`` uses the ``random:<seed>`` syntax (valid or not)."""
    return isinstance(name, str) and name.startswith(RANDOM_PREFIX)


def parse_random_name(name: str) -> int:
    """The seed of a ``random:<seed>`` name.

    Args:
        name: e.g. ``"random:3"``.

    Returns:
        The seed (int >= 0).

    Raises:
        ValueError: when the name is not ``random:`` followed by a non-negative integer.
    """
    rest = name[len(RANDOM_PREFIX) :] if is_random_name(name) else ""
    if not rest.isdigit():
        raise ValueError(
            f"bad random mixture name {name!r}; expected 'random:<seed>' with an integer seed >= 0, e.g. 'random:3'"
        )
    return int(rest)


def random_mixture_suite(n: int = 10, base_seed: int = 0) -> dict[str, GaussianMixtureTeacher]:
    """The named set ``random:<base_seed>`` .. ``random:<base_seed + n - 1>`` (the ``fewstep bench`` set: n=10, 0).

    Args:
        n: Number of mixtures (>= 1).
        base_seed: Seed of the first mixture (>= 0).

    Returns:
        Ordered dict name -> teacher.

    Raises:
        ValueError: for n < 1 or base_seed < 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"random mixture suite size n must be an int >= 1; got {n!r}")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"base_seed must be an int >= 0; got {base_seed!r}")
    return {f"{RANDOM_PREFIX}{s}": random_mixture(s) for s in range(base_seed, base_seed + n)}
