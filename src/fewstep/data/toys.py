"""Toy 2-D datasets without an analytic teacher: checkerboard, two moons, two spirals.

:func:`fewstep.data.datasets.get_dataset` builds them by name (``checkerboard``, ``moons``, ``spirals``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.data.base import Dataset, check_n

__all__ = ["CheckerboardDataset", "MoonsDataset", "SpiralsDataset"]


class CheckerboardDataset(Dataset):
    """Uniform on the 8 dark unit squares (i + j even) of a 4x4 board over [-2, 2]^2.

    Args:
        conditional: Label each sample by its row parity (2 classes), as in the ``grid`` preset.
    """

    def __init__(self, conditional: bool = False) -> None:
        self.event_shape = (2,)
        self.num_classes = 2 if conditional else None
        cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self.cells = torch.tensor(cells, dtype=torch.long)  # (8, 2): (row i, column j)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Cell ~ Uniform{8 dark squares}; (x, y) = (-2 + j + U, -2 + i + U')."""
        check_n(n)
        cell = self.cells[torch.randint(0, 8, (n,), generator=generator)]
        u = torch.rand(n, 2, generator=generator)
        x = torch.stack([-2.0 + cell[:, 1] + u[:, 0], -2.0 + cell[:, 0] + u[:, 1]], dim=1).to(torch.float32)
        return x, (cell[:, 0] % 2 if self.num_classes else None)


class MoonsDataset(Dataset):
    r"""Two interleaved half circles (sklearn ``make_moons``), centred and scaled, with Gaussian noise.

    Class 0: :math:`(\cos\theta, \sin\theta)`, class 1: :math:`(1 - \cos\theta, 0.5 - \sin\theta)`,
    :math:`\theta \sim U[0, \pi]`; then :math:`x \leftarrow \text{scale}\,(x - (0.5, 0.25)) + \text{noise}\,z`.

    Args:
        noise: Std of the added Gaussian noise (after scaling).
        scale: Scale factor (1.5 maps the moons into roughly [-2.3, 2.3] x [-1.2, 1.2]).
        conditional: Return the moon index as label.
    """

    def __init__(self, noise: float = 0.05, scale: float = 1.5, conditional: bool = True) -> None:
        if noise < 0 or scale <= 0:
            raise ValueError(f"need noise >= 0 and scale > 0; got noise={noise}, scale={scale}")
        self.noise, self.scale = noise, scale
        self.event_shape = (2,)
        self.num_classes = 2 if conditional else None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Label ~ Bernoulli(1/2), theta ~ U[0, pi], point on that moon, centred, scaled, plus noise."""
        check_n(n)
        lab = torch.randint(0, 2, (n,), generator=generator)
        th = math.pi * torch.rand(n, generator=generator)
        outer = torch.stack([torch.cos(th), torch.sin(th)], 1)
        inner = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], 1)
        x = torch.where(lab[:, None] == 0, outer, inner) - torch.tensor([0.5, 0.25])
        x = self.scale * x + self.noise * torch.randn(n, 2, generator=generator)
        return x.to(torch.float32), (lab if self.num_classes else None)


class SpiralsDataset(Dataset):
    r"""Two interleaved spirals: :math:`\theta = \sqrt{u}\,\theta_{max}`, :math:`\theta_{max} = 2\pi\,\text{turns}`,
    radius :math:`r = R\theta/\theta_{max}`, class c rotated by :math:`c\pi`, plus Gaussian noise.

    Args:
        noise: Std of the added noise.
        radius: Outer radius R.
        turns: Number of turns of each spiral.
        conditional: Return the spiral index as label.
    """

    def __init__(self, noise: float = 0.05, radius: float = 2.0, turns: float = 1.5, conditional: bool = True) -> None:
        if noise < 0 or radius <= 0 or turns <= 0:
            raise ValueError(f"need noise >= 0, radius > 0, turns > 0; got {noise}, {radius}, {turns}")
        self.noise, self.radius, self.turns = noise, radius, turns
        self.event_shape = (2,)
        self.num_classes = 2 if conditional else None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Label ~ Bernoulli(1/2), theta = sqrt(u) theta_max, r = R theta / theta_max, rotated by label * pi."""
        check_n(n)
        lab = torch.randint(0, 2, (n,), generator=generator)
        th_max = 2 * math.pi * self.turns
        th = torch.sqrt(torch.rand(n, generator=generator)) * th_max  # ~uniform density along the arc
        r = self.radius * th / th_max
        ang = th + math.pi * lab
        x = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], 1)
        x = x + self.noise * torch.randn(n, 2, generator=generator)
        return x.to(torch.float32), (lab if self.num_classes else None)

