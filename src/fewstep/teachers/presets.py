r"""Named Gaussian-mixture teachers: the analytic targets every benchmark and test is measured on.

Each preset is a data distribution :math:`p_0 = \sum_k w_k N(\mu_k, \Sigma_k)` (optionally with a class per
component) wrapped in a :class:`~fewstep.teachers.gmm.GaussianMixtureTeacher`, whose velocity, score,
log-density and samples are exact at every t on the chosen path.

* ``ring8``: 8 components on a circle of radius 2, std 0.1, equal weights; conditional: 4 classes,
  class c = components {c, c+4} (opposite pairs), so the class-conditional and guided fields differ.
* ``aniso3``: 3 rotated, elongated full-covariance 2-D components, weights (0.5, 0.3, 0.2); conditional:
  one class per component.
* ``grid``: the 8 dark squares of a 4x4 checkerboard over [-2, 2]^2 (centres, std 0.15), equal weights;
  conditional: 2 classes by row parity (alternating rows).
* ``shared3``: classes that overlap at t=0 through a shared component: 3 own modes at radius 1.5 (angles
  0, 120, 240 degrees, std 0.35, weight 0.2 each) plus a central mode N(0, 0.35² I) of weight 0.4 that every
  class owns a third of; conditional: class c = {own mode c, its share of the centre}.
* ``overlap2``: two neighbouring classes that overlap at t=0: N((∓0.5, 0), 0.5² I), weights 1/2; conditional: one
  class each. On these two the guided-ODE target, the tilted density p(x|c)^w p(x)^(1−w) and the w = 1 mixture
  are measurably apart for w > 1 (docs/results/dm_targets.md).
* ``digits``: a 64-D mixture fitted per digit class to sklearn's bundled 8x8 digits (pixels x/8 - 1 in
  [-1, 1]), weights = class frequency x component weight; always carries its 10 classes.

``random:<seed>`` is a mixture drawn from the seed (:mod:`fewstep.teachers.random_mixtures`: 2-16 dimensions,
3-10 full-covariance components, unequal weights). Anything else that names an existing ``.json`` file is loaded with
:meth:`GaussianMixtureTeacher.from_json`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fewstep.core.paths import AffinePath
from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = ["PRESETS", "load_preset", "digits_mixture"]

PRESETS: dict[str, str] = {
    "ring8": "8 Gaussians on a circle of radius 2, std 0.1, equal weights (conditional: 4 classes of opposite pairs)",
    "aniso3": "3 rotated elongated full-covariance 2-D Gaussians, weights 0.5/0.3/0.2 (conditional: one class each)",
    "grid": "8 Gaussians (std 0.15) at the dark squares of a 4x4 checkerboard on [-2,2]^2 (conditional: 2 row classes)",
    "shared3": "3 classes (own mode at radius 1.5, std 0.35) sharing a central mode N(0, 0.35^2 I) of weight 0.4",
    "overlap2": "2 overlapping classes N((-0.5, 0), 0.25 I) and N((0.5, 0), 0.25 I), equal weights",
    "digits": "64-D full-covariance mixture fitted per class to sklearn's 8x8 digits in [-1,1] (10 classes)",
}

Spec = tuple[Tensor, Tensor, Tensor, Tensor]  # weights, means, covariances, classes


def _rotated_cov(theta_deg: float, std_major: float, std_minor: float) -> Tensor:
    r""":math:`\Sigma = R(\theta)\,\mathrm{diag}(\sigma_1^2, \sigma_2^2)\,R(\theta)^T`."""
    th = math.radians(theta_deg)
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=torch.float64)) @ rot.T


def _ring8() -> Spec:
    r"""Means :math:`2(\cos 2\pi k/8, \sin 2\pi k/8)`, :math:`\Sigma_k = 0.01 I`, classes :math:`k \bmod 4`."""
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    covs = (0.1**2) * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone()
    return torch.full((8,), 1 / 8, dtype=torch.float64), means, covs, torch.arange(8) % 4


def _aniso3() -> Spec:
    """Three distinct rotated ellipses with unequal weights; class k = component k."""
    means = torch.tensor([[-1.2, -0.6], [1.0, 0.9], [0.6, -1.4]], dtype=torch.float64)
    covs = torch.stack([_rotated_cov(30.0, 0.6, 0.1), _rotated_cov(-45.0, 0.45, 0.15),
                        _rotated_cov(80.0, 0.35, 0.08)])
    return torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, covs, torch.arange(3)


def _grid() -> Spec:
    """Centres (x_j, y_i) in {-1.5,-0.5,0.5,1.5}^2 with i + j even (dark squares); class = row i mod 2."""
    centres = [-1.5, -0.5, 0.5, 1.5]
    means, classes = [], []
    for i, y in enumerate(centres):
        for j, x in enumerate(centres):
            if (i + j) % 2 == 0:
                means.append([x, y])
                classes.append(i % 2)
    covs = (0.15**2) * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone()
    return (torch.full((8,), 1 / 8, dtype=torch.float64), torch.tensor(means, dtype=torch.float64), covs,
            torch.tensor(classes))


def _shared3() -> Spec:
    r"""Own modes :math:`1.5(\cos 2\pi c/3, \sin 2\pi c/3)` (weight 0.2) + the centre, split 0.4/3 per class."""
    ang = 2 * math.pi * torch.arange(3, dtype=torch.float64) / 3
    own = 1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    means = torch.cat([own, torch.zeros(3, 2, dtype=torch.float64)])
    weights = torch.tensor([0.2] * 3 + [0.4 / 3] * 3, dtype=torch.float64)
    covs = (0.35**2) * torch.eye(2, dtype=torch.float64).expand(6, 2, 2).clone()
    return weights, means, covs, torch.tensor([0, 1, 2, 0, 1, 2])


def _overlap2() -> Spec:
    """Two isotropic Gaussians (std 0.5) at (-0.5, 0) and (0.5, 0), one class each."""
    means = torch.tensor([[-0.5, 0.0], [0.5, 0.0]], dtype=torch.float64)
    covs = (0.5**2) * torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone()
    return torch.full((2,), 0.5, dtype=torch.float64), means, covs, torch.arange(2)


@functools.lru_cache(maxsize=4)
def digits_mixture(components_per_class: int = 3, reg_covar: float = 1e-2, seed: int = 0) -> Spec:
    r"""Fit :math:`p(x) = \sum_c \pi_c \sum_j w_{cj} N(\mu_{cj}, \Sigma_{cj})` to sklearn's digits (x/8 - 1).

    Per class c a full-covariance ``sklearn.mixture.GaussianMixture`` with ``components_per_class``
    components (``reg_covar`` added to every covariance diagonal, fixed ``random_state``); the global weights
    are the class frequency :math:`\pi_c` times the within-class weight :math:`w_{cj}`. Cached in memory.

    Args:
        components_per_class: Mixture components fitted per digit class (>= 1).
        reg_covar: Value added to every covariance diagonal (> 0).
        seed: ``random_state`` of the sklearn fits.

    Returns:
        (weights (K,), means (K, 64), covariances (K, 64, 64), classes (K,)) as float64 / long tensors.
    """
    if components_per_class < 1:
        raise ValueError(f"components_per_class must be >= 1, got {components_per_class}")
    if reg_covar <= 0:
        raise ValueError(f"reg_covar must be > 0 so that covariances are positive definite, got {reg_covar}")
    from sklearn.datasets import load_digits
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    data = load_digits()
    x = data.data / 8.0 - 1.0
    y = data.target
    weights, means, covs, classes = [], [], [], []
    for c in range(10):
        xc = x[y == c]
        with threadpool_limits(1):  # multi-threaded BLAS is ~50x slower on these 64x64 problems
            gm = GaussianMixture(components_per_class, covariance_type="full", reg_covar=reg_covar,
                                 random_state=seed, max_iter=200).fit(xc)
        pi_c = len(xc) / len(x)
        weights.append(torch.as_tensor(gm.weights_ * pi_c))
        means.append(torch.as_tensor(gm.means_))
        cv = torch.as_tensor(gm.covariances_)
        covs.append(0.5 * (cv + cv.transpose(1, 2)))
        classes.append(torch.full((components_per_class,), c, dtype=torch.long))
    w = torch.cat(weights).to(torch.float64)
    w = w / w.sum()
    return w, torch.cat(means).to(torch.float64), torch.cat(covs).to(torch.float64), torch.cat(classes)


_BUILDERS: dict[str, Callable[[], Spec]] = {"ring8": _ring8, "aniso3": _aniso3, "grid": _grid,
                                            "shared3": _shared3, "overlap2": _overlap2,
                                            "digits": digits_mixture}


def load_preset(name: str | Path, conditional: bool = False,
                path: str | AffinePath | None = None) -> GaussianMixtureTeacher:
    """Build a fresh analytic teacher for a named preset (see :data:`PRESETS`) or a mixture JSON file.

    Args:
        name: A preset name (``ring8``, ``aniso3``, ``grid``, ``digits``), ``random:<seed>``, or a path to a JSON
            file with fields weights, means, covariances[, classes, path, event_shape].
        conditional: Attach the preset's classes (``teacher.num_classes`` is then set). ``digits`` always
            carries its 10 classes. A JSON file keeps the classes it defines; True requires it to define some.
        path: Probability path ("linear", "cosine" or an AffinePath); default linear for presets and the
            file's own path (or linear) for JSON files.

    Returns:
        A new :class:`GaussianMixtureTeacher` (never a shared object, so ``.to(device)`` is safe).

    Raises:
        ValueError: for an unknown name, or a JSON file that is not a valid mixture.
    """
    key = str(name)
    if key.startswith("random:"):  # random:<seed>, see fewstep.teachers.random_mixtures
        from fewstep.teachers.random_mixtures import parse_random_name, random_mixture

        return random_mixture(parse_random_name(key), conditional=conditional, path="linear" if path is None else path)
    if key in _BUILDERS:
        w, mu, cov, cls = _BUILDERS[key]()
        keep_classes = conditional or key == "digits"
        return GaussianMixtureTeacher(w.clone(), mu.clone(), cov.clone(), cls.clone() if keep_classes else None,
                                      path="linear" if path is None else path)
    p = Path(key)
    if p.suffix.lower() == ".json" or p.is_file():
        if not p.is_file():
            raise ValueError(f"mixture file {key!r} does not exist; known presets: {', '.join(PRESETS)}")
        kwargs = {} if path is None else {"path": path}
        teacher = GaussianMixtureTeacher.from_json(p, **kwargs)
        if conditional and teacher.num_classes is None:
            raise ValueError(f"conditional=True but the mixture in {key!r} has no 'classes' field")
        return teacher
    raise ValueError(f"unknown preset {key!r}; expected one of {', '.join(PRESETS)}, random:<seed> or a path to a "
                     "mixture JSON file")
