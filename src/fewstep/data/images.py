r"""Image datasets made offline and deterministically, yielding (image, label) in [-1, 1].

* ``digits8``: sklearn's 1797 real 8x8 digits as (1, 8, 8) images, :math:`x = v/8 - 1` for pixel values
  v in 0..16 (the :class:`~fewstep.data.datasets.DigitsDataset` split, with ``image=True``).
* ``digits16``: the same digits upsampled to 16x16 (bilinear) and augmented: every digit appears ``copies``
  times, copy 0 as is and the others under a random affine map (rotation :math:`\pm` ``max_rotate`` degrees,
  scale in [1 - ``max_scale``, 1 + ``max_scale``], translation :math:`\pm` ``max_shift`` pixels) drawn from a
  ``torch.Generator`` seeded by ``seed``, so every call builds the same tensor. Pixels are
  :math:`x = 2u - 1` with u = v/16 in [0, 1] after resampling (background -1). The train/test split is that of
  the underlying 8x8 digits, so test images come from digits never seen in training.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from fewstep.data.datasets import DigitsDataset, TensorDataset, register_dataset

__all__ = ["Digits16Dataset", "digits8", "augmented_digits16", "real_images", "IMAGE_DATASETS"]

IMAGE_DATASETS: dict[str, tuple[int, int, int]] = {"digits8": (1, 8, 8), "digits16": (1, 16, 16)}


def digits8(split: str = "train", conditional: bool = True, test_fraction: float = 0.2, seed: int = 0) -> DigitsDataset:
    """sklearn's real 8x8 digits as (1, 8, 8) images in [-1, 1] with labels 0-9 (split ``train``/``test``/``all``)."""
    return DigitsDataset(split=split, image=True, test_fraction=test_fraction, seed=seed, conditional=conditional)


@lru_cache(maxsize=8)
def augmented_digits16(split: str = "train", copies: int = 8, seed: int = 0, max_rotate: float = 10.0,
                       max_scale: float = 0.1, max_shift: float = 1.0) -> tuple[Tensor, Tensor]:
    r"""The ``digits16`` tensors (images (N, 1, 16, 16) in [-1, 1], labels (N,)), N = copies x digits in ``split``.

    Each augmented copy resamples the upsampled digit at :math:`A^{-1}(p - b)` (``affine_grid``, bilinear,
    zero = background padding) with :math:`A = s R(\theta)` and shift b (see the module docstring).
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if not (0 <= max_rotate <= 180 and 0 <= max_scale < 1 and 0 <= max_shift <= 8):
        raise ValueError(f"need 0 <= max_rotate <= 180, 0 <= max_scale < 1, 0 <= max_shift <= 8; got "
                         f"{max_rotate}, {max_scale}, {max_shift}")
    base = DigitsDataset(split=split, image=True)
    x8, y = base.tensors()
    u = (x8 + 1.0) / 2.0  # v/16 in [0, 1]
    u16 = torch.nn.functional.interpolate(u, size=(16, 16), mode="bilinear", align_corners=False)
    n = u16.shape[0]
    g = torch.Generator().manual_seed(seed)
    out = [u16]
    for _ in range(copies - 1):
        ang = (2 * torch.rand(n, generator=g) - 1) * math.radians(max_rotate)
        scale = 1 + (2 * torch.rand(n, generator=g) - 1) * max_scale
        shift = (2 * torch.rand(n, 2, generator=g) - 1) * max_shift * (2.0 / 16.0)  # pixels -> [-1, 1] units
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale  # inverse map: rotate by -ang, scale by 1/s
        theta = torch.stack([torch.stack([cos, sin, -(cos * shift[:, 0] + sin * shift[:, 1])], 1),
                             torch.stack([-sin, cos, -(-sin * shift[:, 0] + cos * shift[:, 1])], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(u16.shape), align_corners=False)
        out.append(torch.nn.functional.grid_sample(u16, grid, mode="bilinear", padding_mode="zeros",
                                                   align_corners=False))
    x = torch.cat(out).clamp(0.0, 1.0) * 2.0 - 1.0
    return x.contiguous(), y.repeat(copies)


class Digits16Dataset(TensorDataset):
    """``digits16``: upsampled + augmented real digits, (1, 16, 16) in [-1, 1], labels 0-9 (module docstring).

    Args:
        split: ``train``, ``test`` or ``all`` (the 8x8 digits' split).
        copies: Images per digit (copy 0 unaugmented).
        seed: Seed of the augmentation generator.
        conditional: Return labels.
    """

    def __init__(self, split: str = "train", copies: int = 8, seed: int = 0, conditional: bool = True) -> None:
        x, y = augmented_digits16(split, copies, seed)
        self.split = split
        super().__init__(x, y if conditional else None, num_classes=10 if conditional else None)


def real_images(name: str, split: str = "all") -> tuple[Tensor, Tensor]:
    """All real images and labels of an image set (``digits8`` or ``digits16``) for metrics."""
    if name == "digits8":
        return digits8(split).tensors()  # type: ignore[return-value]
    if name == "digits16":
        return augmented_digits16(split)
    raise ValueError(f"unknown image set {name!r}; expected one of {sorted(IMAGE_DATASETS)}")


register_dataset("digits8", digits8, "sklearn's real 8x8 digits as (1,8,8) images in [-1,1], labels 0-9 "
                 "(fewstep.data.images)")
register_dataset("digits16", Digits16Dataset, "digits upsampled to (1,16,16) + 7 deterministic affine copies each, "
                 "[-1,1], labels 0-9")
