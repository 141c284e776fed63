"""The dataset interface: ``sample(n, generator=None) -> (x0, labels)`` and the check of ``n``.

x0 is float32 of shape (n, *event_shape), labels a LongTensor (n,) in [0, num_classes) or None; all randomness comes
from the given ``torch.Generator``, so that a seeded generator reproduces a batch exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Dataset", "check_n"]


def check_n(n: int) -> None:
    """Raise ``ValueError`` unless ``n`` is a non-negative int.

    Args:
        n: Number of samples requested.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


class Dataset(ABC):
    """A source of data samples x0 with optional labels.

    Attributes:
        event_shape: Shape of one sample.
        num_classes: Number of classes, or None when samples carry no labels.
    """

    event_shape: tuple[int, ...]
    num_classes: int | None = None

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Draw ``n`` samples: (x0 float32 (n, *event_shape), labels long (n,) or None)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(event_shape={self.event_shape}, num_classes={self.num_classes})"

