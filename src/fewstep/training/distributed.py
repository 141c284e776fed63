r"""Multi-process training helpers: torchrun initialisation, rank helpers, explicit gradient all-reduce.

Launch with ``python -m torch.distributed.run --nproc_per_node N -m fewstep.cli distill ...``; every process
reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` from the environment.
The backend is gloo on CPU and nccl on CUDA.

Gradients are synchronised explicitly after ``backward()`` instead of through ``DistributedDataParallel``
(methods call their student several times per loss and ``torch.func.jvp`` needs the bare module): for
every parameter p,

.. math::
    g_p \leftarrow \frac{1}{W}\sum_{r=0}^{W-1} g_p^{(r)},

computed in buckets (gradients flattened into one buffer of at most ``bucket_mb`` MiB, one ``all_reduce``
SUM per bucket, divided by the world size W), which is what DDP's reducer computes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fewstep.training.fsdp import is_sharded

__all__ = [
    "init_distributed", "is_distributed", "get_rank", "get_world_size", "get_local_rank", "is_main_process",
    "barrier", "allreduce_gradients", "broadcast_module", "broadcast_string", "all_reduce_mean", "all_reduce_log_means",
    "cleanup",
]


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank within the node, from ``LOCAL_RANK`` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0: the only rank that logs, writes figures and checkpoints."""
    return get_rank() == 0


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment variables, if they are set.

    Args:
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available). On CUDA each process uses
            ``cuda:LOCAL_RANK``.

    Returns:
        (rank, world_size, device). Without ``WORLD_SIZE`` in the environment this is (0, 1, device) and no
        process group is created.

    Raises:
        ValueError: on an unknown device name or inconsistent environment variables.
    """
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError("WORLD_SIZE is set but RANK is not; launch with torchrun")
        if use_cuda:
            torch.cuda.set_device(get_local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") and world == 1 else f"cuda:{get_local_rank()}")
    else:
        dev = torch.device("cpu")
    return get_rank(), get_world_size(), dev


def cleanup() -> None:
    """Destroy the process group if one exists, after a barrier: every rank tears down together (a rank that
    destroyed its gloo group while another was still writing files aborted with "terminate called without an
    active exception" in one of our CI runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def _params(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Parameter]:
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    seen: set[int] = set()
    out = []
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def allreduce_gradients(modules: nn.Module | Iterable[nn.Module], bucket_mb: float = 25.0) -> int:
    r"""Average gradients over ranks in flat buckets: g <- (1/W) sum_r g^(r).

    Parameters whose ``.grad`` is None on this rank take part with zeros (so that every rank issues the
    same collectives) and receive the averaged gradient. FSDP-sharded (DTensor) parameters are skipped: their
    gradients are already averaged by FSDP's reduce-scatter.

    Args:
        modules: A module or several; every parameter with ``requires_grad`` is synchronised.
        bucket_mb: Maximum bucket size in MiB.

    Returns:
        The number of all_reduce calls issued (0 when not distributed).
    """
    if not is_distributed():
        return 0
    world = get_world_size()
    params = [p for p in _params(modules) if p.requires_grad and not is_sharded(p)]  # FSDP reduce-scatters those
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    calls = 0
    limit = int(bucket_mb * 2**20)
    bucket: list[Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size, calls
        if not bucket:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in bucket:
            by_dtype.setdefault(g.dtype, []).append(g)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n
            calls += 1
        bucket, size = [], 0

    for p in params:
        g = p.grad
        assert g is not None
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= limit:
            flush()
    flush()
    return calls


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks (identical start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean of a tensor over ranks (returned unchanged when not distributed)."""
    if not is_distributed():
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def all_reduce_log_means(window: dict[str, list[float]]) -> dict[str, float]:
    """Each key's mean over its logged values, averaged over ranks (one row of the trainer's log).

    Args:
        window: The values logged per key since the last row (every rank holds the same keys).

    Returns:
        The mean per key (keys sorted), the same on every rank.
    """
    keys = sorted(window)
    means = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64)
    means = all_reduce_mean(means)
    return {k: float(v) for k, v in zip(keys, means)}


def broadcast_string(text: str, src: int = 0) -> str:
    """Rank ``src``'s string on every rank (e.g. a run-folder path), sent as bytes in tensors (no pickling)."""
    if not is_distributed():
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.long)
    dist.broadcast(n, src=src)
    buf = data if get_rank() == src else torch.zeros(int(n), dtype=torch.uint8)
    dist.broadcast(buf, src=src)
    return bytes(buf.tolist()).decode()
