"""Image grids: a plain mosaic of images and a PNG with one row per class and one column per sampler / NFE.

Images are (n, C, H, W) in [-1, 1]; class-row grids expect balanced labels :math:`c_i = i \bmod K`, so the
first ``K * per_cell`` images hold ``per_cell`` examples of every class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["image_mosaic", "save_grid", "class_grid_samples"]



def image_mosaic(x: Tensor, cols: int | None = None) -> Any:
    """Tile images (n, C, H, W) in [-1, 1] into one array with a 1-pixel background gap: channel 0 as (rows*(H+1),
    cols*(W+1)) with background -1, or for C = 3 an RGB array in [0, 1] of shape (..., 3)."""
    import math

    x = x.detach().cpu().float().clamp(-1, 1)
    n, c, h, w = x.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    ch = 3 if c == 3 else 1
    img = torch.full((ch, rows * (h + 1), cols * (w + 1)), -1.0)
    for i in range(n):
        a, b = divmod(i, cols)
        img[:, a * (h + 1):a * (h + 1) + h, b * (w + 1):b * (w + 1) + w] = x[i, :ch]
    return ((img.permute(1, 2, 0) + 1) / 2).numpy() if ch == 3 else img[0].numpy()


def save_grid(columns: dict[str, Tensor], path: str | Path, num_classes: int = 10, per_cell: int = 2) -> Path:
    """PNG with one row per class and one column per entry of ``columns`` (title -> images with balanced labels
    i mod num_classes, as from :func:`eval_noise`); ``per_cell`` images of that class side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(num_classes, len(names), figsize=(1.1 * per_cell * len(names) + 0.5, 1.1 * num_classes),
                             squeeze=False)
    for j, title in enumerate(names):
        x = columns[title].detach().cpu().float()
        for c in range(num_classes):
            imgs = [x[c + num_classes * i, 0] for i in range(per_cell)]
            pad = torch.full((imgs[0].shape[0], 1), -1.0)
            row = torch.cat([torch.cat([im, pad], 1) for im in imgs], 1)
            ax = axes[c, j]
            ax.imshow(row.clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(str(c))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def class_grid_samples(student: Any, spec: Any, nfe: list[int] | tuple[int, ...], num_classes: int,
                       per_cell: int = 2, seed: int = 0, grid: Any = None) -> dict[str, Tensor]:
    r"""Samples for a class-row grid: one entry per NFE, ``num_classes * per_cell`` images each.

    Every column starts from the same noise :math:`x_1 \sim N(0, I)` (generator seed ``seed``) with labels
    :math:`c_i = i \bmod K`, so a row shows the same draws of one class at each NFE; re-noising (gamma > 0) draws
    from seed ``seed + RENOISE_SEED_OFFSET`` (:func:`~fewstep.sampling.spec.sample_with`).

    Args:
        student: A conditional flow-map student (``student.net.event_shape``, ``student.net.num_classes``).
        spec: The run's :class:`~fewstep.sampling.spec.SamplerSpec`.
        nfe: Step counts, one column each.
        num_classes: K, one row each.
        per_cell: Images of one class per cell.
        seed: Seed of the noise and of any re-noising.
        grid: Optional explicit time grid (overrides the spec's rule for every column).

    Returns:
        Column title ``"<k> NFE"`` -> images of shape (K * per_cell, C, H, W).

    Raises:
        ValueError: If ``per_cell`` < 1 or ``nfe`` is empty.
    """
    from fewstep.sampling.spec import sample_with

    if per_cell < 1 or not nfe:
        raise ValueError(f"a class grid needs per_cell >= 1 and at least one NFE; got {per_cell}, {list(nfe)}")
    n = num_classes * per_cell
    x1 = torch.randn((n, *tuple(student.net.event_shape)), generator=torch.Generator().manual_seed(seed))
    cond = torch.arange(n) % num_classes
    return {f"{k} NFE": sample_with(student, x1, spec, int(k), grid=grid, cond=cond, seed=seed).x
            for k in nfe}
