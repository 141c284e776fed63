"""The sample figure of ``fewstep eval`` and ``fewstep sample``: a picture of n samples whatever their shape.

2-D points are a scatter, (n, C, H, W) images and 64-D digit vectors a mosaic
(:func:`fewstep.sampling.image_grid.image_mosaic`), other dimensions pairwise projections.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from fewstep.sampling.image_grid import image_mosaic

__all__ = ["save_figure"]


def save_figure(x: Tensor, path: Path, title: str, ref: Tensor | None = None) -> Path | None:
    """Scatter for 2-D samples, an image grid for 64-D (8x8), pairwise projections of the first 4 coordinates
    for other dimensions >= 3 (reference samples in grey when given).

    Args:
        x: Samples (n, d) or images (n, C, H, W).
        path: The PNG to write.
        title: Figure title.
        ref: Optional reference samples drawn in grey (scatter and projections).

    Returns:
        ``path``, or None when nothing can be drawn (1-D samples).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = x.reshape(x.shape[0], -1).detach().cpu().float()
    r = None if ref is None else ref.reshape(ref.shape[0], -1).detach().cpu().float()
    d = flat.shape[1]
    if x.dim() == 4 and d != 64:  # (n, C, H, W) images: a grid of the first 64 (channel 0 or RGB)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(image_mosaic(x[:64]), cmap="gray_r", vmin=-1, vmax=1)
        ax.axis("off")
        ax.set_title(title)
    elif d == 64:  # 8x8 digit vectors
        k = min(64, flat.shape[0])
        cols = int(math.ceil(math.sqrt(k)))
        rows = int(math.ceil(k / cols))
        fig, ax = plt.subplots(figsize=(cols * 0.6 + 1, rows * 0.6 + 1))
        ax.imshow(image_mosaic(flat[:k].reshape(k, 1, 8, 8), cols), cmap="gray_r", vmin=-1, vmax=1)
        ax.axis("off")
        ax.set_title(title)
    elif d == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        if r is not None:
            ax.scatter(r[:, 0], r[:, 1], s=2, c="0.7", label="reference")
        ax.scatter(flat[:, 0], flat[:, 1], s=2, label="samples")
        ax.set_aspect("equal")
        ax.set_title(title)
    elif d >= 3:
        dims = min(d, 4)
        pairs = [(i, j) for i in range(dims) for j in range(i + 1, dims)]
        fig, axes = plt.subplots(1, len(pairs), figsize=(3 * len(pairs), 3), squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            if r is not None:
                ax.scatter(r[:, i], r[:, j], s=1, c="0.7")
            ax.scatter(flat[:, i], flat[:, j], s=1)
            ax.set_xlabel(f"x{i}")
            ax.set_ylabel(f"x{j}")
        fig.suptitle(f"{title} (pairwise projections of the first {dims} of {d} coordinates)")
    else:
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
