r"""What the trainer uses besides the loop: per-step seeds, optimisers, gradient clipping, the LR schedule, EMA.

The student's EMA copies follow

.. math::
    \bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta, \qquad d = \min(d_0, (1+n)/(10+n)) \text{ (warm-up)},

after each student update n.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fewstep.config.schema import TrainConfig
from fewstep.core.ema import ema_update_
from fewstep.training.fsdp import full_tensor

__all__ = ["derive_seed", "lr_factor", "EMA", "make_optimizer", "clip_grad_norm"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def lr_factor(step: int, cfg: TrainConfig) -> float:
    r"""LR multiplier at optimizer step ``step``: linear warm-up, then constant / cosine / linear decay.

    factor = (k+1)/W for k < W; else with p = (k-W)/max(1, K-W) and m = min_lr_ratio:
    constant 1, cosine m + (1-m)(1+cos(pi p))/2, linear 1 - (1-m) p.
    """
    w = cfg.warmup_steps
    if step < w:
        return (step + 1) / w
    p = min(1.0, (step - w) / max(1, cfg.steps - w))
    m = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.lr_schedule == "linear":
        return 1 - (1 - m) * p
    return 1.0


def make_optimizer(module: nn.Module, cfg: TrainConfig, name: str = "student") -> torch.optim.Optimizer:
    """Adam or AdamW over ``module``'s trainable parameters at ``cfg.lr_overrides.get(name, cfg.lr)``.

    Args:
        module: The network to optimise.
        cfg: The train section (optimizer, betas, eps, weight_decay, lr, lr_overrides).
        name: The network's name in ``method.trainable()`` (selects its lr override, names it in errors).

    Returns:
        The optimiser.

    Raises:
        ValueError: the network has no parameter with ``requires_grad``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"trainable network {name!r} has no parameters with requires_grad")
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=float(cfg.lr_overrides.get(name, cfg.lr)), betas=tuple(cfg.betas), eps=cfg.eps,
               weight_decay=cfg.weight_decay)


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    r"""The global gradient norm :math:`\|g\|_2` of ``module`` (full tensors under FSDP), clipped to ``max_norm`` > 0.

    Args:
        module: The network whose parameters' gradients are measured (and clipped).
        max_norm: Clip threshold; 0 measures without clipping.

    Returns:
        The norm before clipping (0.0 when no parameter has a gradient).
    """
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    if not params:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([full_tensor(p.grad.norm()) for p in params])))


class EMA:
    r"""Exponential moving averages of a module with one or several decays: ema <- d ema + (1-d) theta."""

    def __init__(self, module: nn.Module, decays: Sequence[float], warmup: bool = True) -> None:
        self.decays = [float(d) for d in decays]
        self.warmup = warmup
        self.num_updates = 0
        self.copies = {d: copy.deepcopy(module).requires_grad_(False).eval() for d in self.decays}

    def effective_decay(self, decay: float) -> float:
        """min(d, (1+n)/(10+n)) with n = updates so far when warm-up is on, else d."""
        n = self.num_updates
        return min(decay, (1 + n) / (10 + n)) if self.warmup else decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step toward ``module``'s current parameters (:func:`~fewstep.core.ema.ema_update_`)."""
        for d, ema in self.copies.items():
            ema_update_(ema, module, self.effective_decay(d))
        self.num_updates += 1
