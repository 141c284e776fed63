r"""Time samplers for training, driven by given uniforms u in [0, 1) so that they shard reproducibly.

* ``uniform``: t = t_min + (t_max - t_min) u.
* ``logit_normal``: t = sigmoid(m + s * Phi^{-1}(u)) (SD3, MeanFlow), then clipped to [t_min, t_max].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_time", "TIME_SAMPLERS"]

TIME_SAMPLERS: tuple[str, ...] = ("uniform", "logit_normal")


def sample_time(u: Tensor, kind: str = "uniform", t_min: float = 0.0, t_max: float = 1.0,
                mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Map uniforms ``u`` (any shape) to training times in [t_min, t_max].

    Args:
        u: Uniform random numbers in [0, 1).
        kind: ``uniform`` or ``logit_normal``.
        t_min: Smallest time.
        t_max: Largest time.
        mean: Logit-normal location.
        std: Logit-normal scale.

    Returns:
        Times in [t_min, t_max], shaped like ``u``.
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1; got t_min={t_min}, t_max={t_max}")
    if kind == "uniform":
        return t_min + (t_max - t_min) * u
    if kind == "logit_normal":
        z = torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))
        return torch.sigmoid(mean + std * z).clamp(t_min, t_max)
    raise ValueError(f"unknown time sampler {kind!r}; expected one of {TIME_SAMPLERS}")
