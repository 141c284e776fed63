r"""Datasets of data samples x0 (t = 0) with optional class labels, for flow matching and data-based methods.

Every dataset implements :class:`fewstep.data.base.Dataset`: ``sample(n, generator=None) -> (x0, labels)`` with x0
float32 of shape (n, *event_shape) and labels a LongTensor (n,) in [0, num_classes) or None. All randomness comes
from the given ``torch.Generator`` so that a seeded generator reproduces a batch exactly.

* :class:`MixtureDataset`: exact samples :math:`x_0 \sim \sum_k w_k N(\mu_k, \Sigma_k)` of any
  :class:`~fewstep.teachers.gmm.GaussianMixtureTeacher` (label = the class of the drawn component).
* Toy 2-D sets: ``ring8``, ``aniso3``, ``grid`` (the analytic presets), ``checkerboard`` (uniform on the
  dark squares of a 4x4 board on [-2, 2]^2), ``moons`` and ``spirals`` (two classes each; :mod:`fewstep.data.toys`).
* ``digits``: sklearn's 1797 real 8x8 digits as 64-D vectors x/8 - 1 in [-1, 1] (or images (1, 8, 8)),
  a finite set drawn with replacement, split into train/test by a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.data.base import Dataset, check_n
from fewstep.data.toys import CheckerboardDataset, MoonsDataset, SpiralsDataset
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.presets import load_preset

__all__ = ["MixtureDataset", "TensorDataset", "DigitsDataset", "DATASETS", "get_dataset", "register_dataset"]


class MixtureDataset(Dataset):
    """Exact samples of a Gaussian-mixture teacher's data distribution p_0.

    Args:
        teacher: The mixture.
        conditional: Return labels (the class of the drawn component). Default: iff the mixture has classes.

    Raises:
        ValueError: if labels are requested from a mixture without classes.
    """

    def __init__(self, teacher: GaussianMixtureTeacher, conditional: bool | None = None) -> None:
        if not isinstance(teacher, GaussianMixtureTeacher):
            raise ValueError(f"MixtureDataset needs a GaussianMixtureTeacher, got {type(teacher).__name__}")
        if conditional is None:
            conditional = teacher.num_classes is not None
        if conditional and teacher.num_classes is None:
            raise ValueError("conditional=True but the mixture has no classes")
        self.teacher = teacher
        self.event_shape = tuple(teacher.event_shape)
        self.num_classes = teacher.num_classes if conditional else None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """x0 ~ p_0 exactly; labels = classes[component] when conditional."""
        check_n(n)
        x, comp = self.teacher.sample(n, 0.0, generator=generator, dtype=torch.float32, return_components=True)
        labels = self.teacher.classes.cpu()[comp].to(x.device) if self.num_classes is not None else None
        return x, labels


class TensorDataset(Dataset):
    """A finite set of samples (and optional labels) drawn uniformly with replacement.

    Args:
        x: Samples, shape (N, *event_shape).
        labels: Optional labels, shape (N,).
        num_classes: Number of classes (default: max label + 1).
    """

    def __init__(self, x: Tensor, labels: Tensor | None = None, num_classes: int | None = None) -> None:
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must have shape (N, ...) with N >= 1; got {tuple(x.shape)}")
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},); got {tuple(labels.shape)}")
        self.x = x.to(torch.float32)
        self.labels = labels.to(torch.long) if labels is not None else None
        self.event_shape = tuple(x.shape[1:])
        if self.labels is not None:
            self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1
        else:
            self.num_classes = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor | None]:
        """The whole finite set (x, labels)."""
        return self.x, self.labels

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Indices i ~ Uniform{0..N-1} with replacement; returns (x[i], labels[i])."""
        check_n(n)
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.x[idx], (self.labels[idx] if self.labels is not None else None)



class DigitsDataset(TensorDataset):
    """sklearn's real 8x8 digits as x/8 - 1 in [-1, 1], with labels 0..9.

    Args:
        split: ``train``, ``test`` or ``all``.
        image: Return shape (1, 8, 8) instead of (64,).
        test_fraction: Fraction of the 1797 digits held out as the test split.
        seed: Seed of the fixed random permutation defining the split.
        conditional: Return labels.
    """

    def __init__(self, split: str = "train", image: bool = False, test_fraction: float = 0.2, seed: int = 0,
                 conditional: bool = True) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.as_tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
        y = torch.as_tensor(d.target, dtype=torch.long)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        n_test = int(round(test_fraction * x.shape[0]))
        if split == "test":
            perm = perm[:n_test]
        elif split == "train":
            perm = perm[n_test:]
        else:
            perm = torch.arange(x.shape[0])
        x, y = x[perm], y[perm]
        if image:
            x = x.reshape(-1, 1, 8, 8)
        self.split, self.image = split, image
        super().__init__(x, y if conditional else None, num_classes=10 if conditional else None)


def _preset(name: str) -> Callable[..., Dataset]:
    def make(conditional: bool = False, path: str = "linear") -> Dataset:
        return MixtureDataset(load_preset(name, conditional=conditional, path=path), conditional=conditional)
    make.__name__ = f"make_{name}"
    return make


def _digits_mixture(conditional: bool = True, image: bool = False) -> Dataset:
    t = load_preset("digits", conditional=True)
    if image:
        t = GaussianMixtureTeacher(t.weights, t.means, t.covariances, t.classes, path=t.path, event_shape=(1, 8, 8))
    return MixtureDataset(t, conditional=conditional)


_FACTORIES: dict[str, Callable[..., Dataset]] = {
    "ring8": _preset("ring8"), "aniso3": _preset("aniso3"), "grid": _preset("grid"),
    "checkerboard": CheckerboardDataset, "moons": MoonsDataset, "spirals": SpiralsDataset,
    "digits": DigitsDataset, "digits_gmm": _digits_mixture,
}

DATASETS: dict[str, str] = {
    "ring8": "exact samples of the ring8 preset (conditional=True: 4 classes)",
    "aniso3": "exact samples of the aniso3 preset (conditional=True: 3 classes)",
    "grid": "exact samples of the grid preset (conditional=True: 2 row classes)",
    "checkerboard": "uniform on the dark squares of a 4x4 board over [-2,2]^2 (conditional=True: 2 row classes)",
    "moons": "two moons, scaled to about [-2.3,2.3]x[-1.2,1.2], noise 0.05, labels 0/1",
    "spirals": "two interleaved spirals of radius 2, noise 0.05, labels 0/1",
    "digits": "sklearn's real 8x8 digits in [-1,1], 64-D (image=True: (1,8,8)), labels 0-9, split train/test/all",
    "digits_gmm": "exact samples of the digits preset mixture (64-D, labels 0-9)",
}


def register_dataset(name: str, factory: Callable[..., Dataset], description: str) -> None:
    """Make ``name`` a dataset of :func:`get_dataset` (modules such as :mod:`fewstep.data.images` register theirs;
    ``fewstep.data`` imports them, so the names exist whenever this module is imported)."""
    _FACTORIES[name] = factory
    DATASETS[name] = description


def get_dataset(name: str | Path, **kwargs: Any) -> Dataset:
    """Build a dataset by name (see :data:`DATASETS`), or from a mixture JSON file.

    Args:
        name: A name in :data:`DATASETS` or a path to a mixture JSON file.
        **kwargs: Options of that dataset (e.g. ``conditional``, ``split``, ``image``, ``noise``).

    Returns:
        The built dataset.

    Raises:
        ValueError: for an unknown name or an option the dataset does not take.
    """
    key = str(name)
    if key in _FACTORIES:
        factory = _FACTORIES[key]
    elif key.lower().endswith(".json") or Path(key).is_file() or key.startswith("random:"):
        def factory(conditional: bool | None = None, path: str | None = None) -> Dataset:
            return MixtureDataset(load_preset(key, conditional=bool(conditional), path=path), conditional)
    else:
        raise ValueError(f"unknown dataset {key!r}; expected one of {', '.join(DATASETS)}, random:<seed> or a mixture "
                         "JSON file")
    import inspect

    params = inspect.signature(factory).parameters
    unknown = set(kwargs) - set(params)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for dataset {key!r}; valid: {sorted(params)}")
    return factory(**kwargs)
