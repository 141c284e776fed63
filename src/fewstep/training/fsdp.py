r"""FSDP2 for the student (``train.fsdp: true`` under torchrun): shard its network, gather full tensors on demand.

With W ranks, :func:`shard_student` applies ``torch.distributed.fsdp.fully_shard`` to the student's network over a
1-D device mesh of the W processes: every parameter becomes a DTensor holding rows ``[r n/W, (r+1) n/W)`` of
dimension 0 on rank r. The forward pass all-gathers the parameters, the backward pass reduce-scatters the
gradients, so after ``backward()`` each rank holds its rows of

.. math::
    g_p = \frac{1}{W}\sum_{r=0}^{W-1} g_p^{(r)},

the same mean the explicit all-reduce of :mod:`fewstep.training.distributed` computes for unsharded networks
(which skips DTensor parameters). Checkpoints and the EMA copies use full tensors (:func:`full_tensor`, an
all-gather every rank must join), so run folders load on one process; the EMA copies are plain full modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["shard_student", "is_sharded", "full_tensor", "shard_like", "load_full_state_dict", "shard_optimizer_state"]


def is_sharded(t: Tensor) -> bool:
    """True when ``t`` is a DTensor (a parameter, gradient or optimiser moment of an FSDP-sharded network)."""
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The full (unsharded) value of ``t``: an all-gather for a DTensor (every rank must call it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(t: Tensor, like: Tensor) -> Tensor:
    """Cut the full tensor ``t`` (identical on every rank) into a DTensor placed like the DTensor ``like``."""
    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """``module.load_state_dict(state)`` from full tensors, cutting those of sharded entries like the module's own."""
    own = module.state_dict()
    module.load_state_dict({k: shard_like(v, own[k]) if k in own else v for k, v in state.items()})


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser state dict of full tensors (a checkpoint's) with each moment of a sharded parameter cut like it.

    Args:
        optimizer: The optimiser of the (possibly sharded) parameters.
        state: Its ``state_dict()`` as saved, with full tensors.

    Returns:
        ``state`` with every tensor shaped like its DTensor parameter replaced by that parameter's shard.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, moments in state["state"].items():
        p = params[int(idx)]
        if is_sharded(p):
            state["state"][idx] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                                   for k, v in moments.items()}
    return state


def shard_student(student: nn.Module, world: int, device: torch.device) -> nn.Module:
    """Shard the student's network with ``fully_shard`` over a 1-D mesh of ``world`` ranks; returns that network.

    The network (``student.net`` for a :class:`~fewstep.core.flowmap.FlowMap`) is sharded rather than the flow
    map itself, because methods call ``student.velocity`` / ``student.F``, which reach the parameters through
    ``student.net(...)``, the call FSDP hooks to all-gather them.

    Args:
        student: The student flow map (or a bare network).
        world: Number of ranks (the process group must be initialised).
        device: This rank's device (its type names the mesh: ``cpu`` with gloo, ``cuda`` with nccl).

    Returns:
        The sharded module.

    Raises:
        ValueError: if the student has parameters outside its network (they would be neither sharded nor
            all-reduced consistently).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = getattr(student, "net", student)
    if net is not student:
        inside = {id(p) for p in net.parameters()}
        outside = [n for n, p in student.named_parameters() if id(p) not in inside]
        if outside:
            raise ValueError(f"train.fsdp: the student has parameters outside its network {outside[:3]}")
    mesh = init_device_mesh(device.type, (world,))
    fully_shard(net, mesh=mesh)
    return net
