"""Shared helpers of the training-system tests: a tiny dataset, tiny methods, and a trainer factory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods.base import Batch, Method, MethodConfig
from fewstep.methods.registry import get_method
from fewstep.networks.mlp import MLP
from fewstep.training.trainer import TrainConfig, Trainer


class ShiftedGaussian:
    """x0 ~ N(mean, std^2 I) in 2-D with labels in {0, 1} (or None); all randomness from the generator."""

    event_shape = (2,)

    def __init__(self, labels: bool = False) -> None:
        self.num_classes = 2 if labels else None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        x = torch.randn(n, 2, generator=generator) * 0.5 + torch.tensor([1.0, -0.5])
        c = torch.randint(0, 2, (n,), generator=generator) if self.num_classes else None
        return x, c


@dataclass
class TwoNetConfig(MethodConfig):
    """Config of :class:`TwoNetMethod`: how many aux updates per student update."""

    aux_updates: int = 2
    jitter: float = 1e-3


class TwoNetMethod(Method):
    """Test method with an auxiliary net updated ``aux_updates`` times per step (like a DMD fake score).

    aux loss: ||a(x0) - x1||^2; student loss: flow matching plus 0.1 * ||a(x_t)||^2 through a frozen copy.
    Also draws extra noise from torch's global RNG, which the trainer seeds per step.
    """

    name = "_test_two_net"
    description = "test-only method with an auxiliary network"
    config_class = TwoNetConfig
    parameterization = "velocity"
    needs_teacher = False
    needs_data = True

    def __init__(self, student: FlowMap, teacher: nn.Module | None = None, config: Any = None) -> None:
        super().__init__(student, teacher, config)
        self.aux = nn.Linear(2, 2)
        self.after_calls: list[tuple[str, int]] = []

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student, "aux": self.aux}

    def schedule(self, step: int) -> list[str]:
        return ["aux"] * self.config.aux_updates + ["student"]

    def loss(self, name: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        assert batch.x0 is not None
        if name == "aux":
            loss = ((self.aux(batch.x0) - batch.x1) ** 2).mean()
            return loss, {"loss": float(loss.detach())}
        t = batch.u[:, 0]
        x_t = (1 - t[:, None]) * batch.x0 + t[:, None] * batch.x1
        jitter = self.config.jitter * torch.randn_like(x_t)  # global RNG
        v = self.student.velocity(x_t + jitter, t, batch.cond)
        loss = ((v - (batch.x1 - batch.x0)) ** 2).mean()
        return loss, {"loss": float(loss.detach())}

    def after_update(self, name: str, step: int) -> None:
        self.after_calls.append((name, step))


def tiny_student(param: str = "velocity", num_classes: int | None = None, seed: int = 0) -> FlowMap:
    """A 2-layer width-16 MLP flow map, seeded."""
    torch.manual_seed(seed)
    return FlowMap(MLP(2, hidden=16, depth=2, emb_dim=8, num_classes=num_classes,
                       use_s=param == "average_velocity"), param)


def fm_method(seed: int = 0) -> Method:
    """flow_matching on a tiny student."""
    cls = get_method("flow_matching")
    return cls(tiny_student(seed=seed), None, cls.make_config(cond_drop=0.0))


def two_net_method(seed: int = 0, labels: bool = False, jitter: float = 1e-3) -> TwoNetMethod:
    student = tiny_student(num_classes=2 if labels else None, seed=seed)
    torch.manual_seed(seed + 1)
    return TwoNetMethod(student, None, TwoNetConfig(jitter=jitter))


def make_trainer(method: Method, run_dir: Path | None = None, seed: int = 0, labels: bool = False,
                 **kw: Any) -> Trainer:
    """A quiet trainer (no TensorBoard, no progress bar) with small defaults."""
    base = dict(steps=10, batch_size=32, lr=1e-2, log_every=5, tensorboard=False, progress=False)
    base.update(kw)
    return Trainer(method, ShiftedGaussian(labels), TrainConfig(**base), run_dir=run_dir, seed=seed)


def flat_state(module: nn.Module) -> Tensor:
    """All parameters and buffers of a module as one float64 vector."""
    return torch.cat([v.detach().reshape(-1).double() for v in module.state_dict().values()])


def free_port() -> int:
    """A free local TCP port for a torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], timeout: float = 240, nproc: int = 2, cwd: Any = None) -> Any:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc <args>`` on 127.0.0.1 with one thread per rank.

    Args:
        args: What follows the launcher options (a script path and its arguments, or ``-m module ...``).
        timeout: Seconds before the launch is killed.
        nproc: Processes to start.
        cwd: Working directory of the launch (None: the current one).

    Returns:
        The completed process (stdout and stderr captured as bytes).
    """
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, cwd=cwd)
