"""The trainer's batches: one seeded global batch per (step, name, occurrence), cut into this rank's micro-batches.

Every rank draws the same GLOBAL batch from one CPU generator and keeps its own slice, so that training on
``world`` processes with ``grad_accum`` micro-batches each sees exactly the batch of one process
(docs/architecture.md, "Batches and randomness").
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.methods.base import Batch, Method

__all__ = ["draw_global_batch", "rank_micro_batches"]


def draw_global_batch(method: Method, dataset: Any, event_shape: tuple[int, ...], batch_size: int,
                      seed: int) -> Batch:
    """The global batch: x0 and cond from ``dataset``, then x1 ~ N(0, I) and u ~ U[0, 1)^8, from one CPU generator.

    Args:
        method: The method; data-free methods (``uses_data`` false) get ``x0 = None`` (labels only).
        dataset: Object with ``sample(n, generator) -> (x0, cond | None)``, or None (then x0 and cond are None).
        event_shape: Shape of one sample of x1.
        batch_size: Global batch size (over all ranks and micro-batches).
        seed: Seed of the generator (the trainer derives it from (seed, step, name, occurrence)).

    Returns:
        The global :class:`~fewstep.methods.base.Batch`, on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = cond = None
    if dataset is not None:
        x0, cond = dataset.sample(batch_size, generator=g)
    x1 = torch.randn(batch_size, *event_shape, generator=g)
    u = torch.rand(batch_size, 8, generator=g)
    if not method.uses_data(method.config):
        x0 = None  # data-free methods get labels (cond) only
    return Batch(x1=x1, u=u, x0=x0, cond=cond)


def rank_micro_batches(batch: Batch, rank: int, world: int, grad_accum: int, device: torch.device) -> list[Batch]:
    """This rank's micro-batches: the global batch cut into ``world * grad_accum`` equal chunks, moved to ``device``.

    Args:
        batch: The global batch.
        rank: This process's rank.
        world: Number of processes.
        grad_accum: Micro-batches per rank.
        device: Device of the student.

    Returns:
        ``grad_accum`` batches: chunks ``rank * grad_accum`` to ``(rank + 1) * grad_accum - 1``.
    """
    size = batch.size // (world * grad_accum)
    out = []
    for m in range(grad_accum):
        i = (rank * grad_accum + m) * size
        sl = slice(i, i + size)
        out.append(Batch(x1=batch.x1[sl].to(device), u=batch.u[sl].to(device),
                         x0=None if batch.x0 is None else batch.x0[sl].to(device),
                         cond=None if batch.cond is None else batch.cond[sl].to(device)))
    return out
