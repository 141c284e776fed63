r"""MA with a learned teacher: its score converted from a neural velocity, against the analytic teacher's.

A small velocity network (MLP 128x3) is trained on a 2-D Gaussian mixture (4 components at (±1, ±1), std 0.3):
``regression`` fits the mixture's exact velocity :math:`v^*(x_t, t)` (the most accurate teacher for a budget),
``fm`` is flow matching on samples, :math:`\|v_\theta(x_t, t) - (x_1 - x_0)\|^2`; both draw :math:`t = u^2`
(denser near t = 0, where the score conversion :math:`s = -(x + (1-t)v)/t` amplifies velocity errors by 1/t).
The learned teacher is :meth:`ModuleTeacher.from_flowmap`; MA scores it exactly as an analytic teacher
(:func:`fewstep.methods._shared.alignment.end_score`, velocity -> score). Reported: the relative score error
:math:`\|\tilde s_L - \tilde s_A\| / \|\tilde s_A\|` at each time, and the relative difference of the MA gradients
(learned vs analytic score, same student, same samples, exact ODE mode) per window, and the discretisation error
of the MA gradient against RK4 sub-steps for a nonlinear student (the trained network with perturbed weights).

Run::

    python -m fewstep.benchmarks.ma_learned_teacher --train 6000 --objective regression --out teacher.safetensors
    python -m fewstep.benchmarks.ma_learned_teacher --weights teacher.safetensors
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods._shared.alignment import end_score, ma_loss
from fewstep.networks.mlp import MLP
from fewstep.teachers import GaussianMixtureTeacher
from fewstep.teachers.module import ModuleTeacher

__all__ = ["gmm4", "velocity_net", "train_velocity_teacher", "load_velocity_net", "score_error", "perturbed",
           "ma_grad_difference", "substep_error", "main"]

DT = torch.float64


def gmm4() -> GaussianMixtureTeacher:
    """Four equal Gaussians at (±1, ±1) with std 0.3."""
    means = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=DT)
    return GaussianMixtureTeacher([0.25] * 4, means, (0.09 * torch.eye(2, dtype=DT)).expand(4, 2, 2).clone())


def velocity_net(seed: int = 0) -> FlowMap:
    """The teacher network: a velocity-parameterized MLP (hidden 128, depth 3, raw time input)."""
    torch.manual_seed(seed)
    return FlowMap(MLP(2, 128, 3, emb_dim=32, use_s=False, raw_time=True), "velocity")


def train_velocity_teacher(teacher: GaussianMixtureTeacher, steps: int, objective: str = "regression",
                           batch: int = 1024, lr: float = 2e-3, seed: int = 0, t_power: float = 2.0,
                           checkpoint: Callable[[int, FlowMap], None] | None = None,
                           every: int = 1000) -> FlowMap:
    r"""Train :func:`velocity_net` on ``teacher`` (float32, Adam, cosine decay to 1 % of ``lr``).

    Args:
        teacher: The analytic mixture (samples; exact velocity for ``regression``).
        steps: Optimizer steps.
        objective: ``regression`` (target :math:`v^*(x_t, t)`) or ``fm`` (target :math:`x_1 - x_0`).
        batch: Rows per step.
        lr: Peak learning rate.
        seed: Seed of the network and the data.
        t_power: :math:`t = u^{p}` with u uniform.
        checkpoint: Called as ``checkpoint(step, net)`` every ``every`` steps and at the end.
        every: Checkpoint interval.

    Returns:
        The trained network (float32, eval mode).
    """
    if objective not in ("regression", "fm"):
        raise ValueError(f"unknown objective {objective!r}; expected 'regression' or 'fm'")
    net = velocity_net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * i / steps)))
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x0 = teacher.sample(batch, generator=g, dtype=DT)
        x1 = torch.randn(batch, 2, generator=g, dtype=DT)
        t = torch.rand(batch, generator=g, dtype=DT) ** t_power
        xt = (1 - t)[:, None] * x0 + t[:, None] * x1
        target = teacher.velocity(xt, t) if objective == "regression" else x1 - x0
        loss = ((net.velocity(xt.float(), t.float()) - target.float()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if checkpoint is not None and ((i + 1) % every == 0 or i + 1 == steps):
            checkpoint(i + 1, net)
    return net.eval()


def load_velocity_net(path: str | Path) -> FlowMap:
    """A :func:`velocity_net` with the weights of a safetensors file, in float64."""
    from safetensors.torch import load_file

    net = velocity_net(0)
    net.load_state_dict(load_file(str(path)))
    return net.double().eval().requires_grad_(False)


def score_error(learned: nn.Module, analytic: GaussianMixtureTeacher, t: float, t_min: float = 0.05,
                n: int = 4000, seed: int = 0) -> float:
    r"""RMS relative error of the window-end target score :math:`\tilde s` at time t on samples of :math:`p_t`."""
    x = analytic.sample(n, t, generator=torch.Generator().manual_seed(seed), dtype=DT)
    tt = torch.full((n,), t, dtype=DT)
    a, b = end_score(analytic, x, tt, t_min), end_score(learned, x, tt, t_min)
    return float((a - b).pow(2).sum(1).mean().sqrt() / a.pow(2).sum(1).mean().sqrt())


def perturbed(net: nn.Module, scale: float = 0.1, seed: int = 1) -> nn.Module:
    """A trainable copy of ``net`` with every weight w -> w + scale * std(w) * z (an imperfect student)."""
    out = copy.deepcopy(net).requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.numel() > 1:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def ma_grad_difference(student: nn.Module, learned: nn.Module, analytic: GaussianMixtureTeacher, t_start: float,
                       t_end: float, n: int = 4096, seed: int = 2, t_min: float = 0.05, **kw: object) -> float:
    r""":math:`\|g_L - g_A\|/\|g_A\|` of the MA gradients scored by the learned and the analytic teacher."""
    x = analytic.sample(n, t_start, generator=torch.Generator().manual_seed(seed), dtype=DT)
    grads = []
    for target in (analytic, learned):
        student.zero_grad()
        ma_loss(student, target, x, t_start, t_end, t_min=t_min, compute_kl=False, **kw).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def substep_error(student: nn.Module, analytic: GaussianMixtureTeacher, t_start: float, t_end: float, substeps: int,
                  reference: int = 32, n: int = 2048, seed: int = 3, t_min: float = 0.05) -> float:
    r"""Discretisation error of the exact-mode MA gradient (RK4, M sub-steps) against M = ``reference``."""
    x = analytic.sample(n, t_start, generator=torch.Generator().manual_seed(seed), dtype=DT)
    grads = []
    for m in (substeps, reference):
        student.zero_grad()
        ma_loss(student, analytic, x, t_start, t_end, mode="exact", substeps=m, solver="rk4", t_min=t_min,
                compute_kl=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    return float((grads[0] - grads[1]).norm() / grads[1].norm())


def main(argv: Sequence[str] | None = None) -> None:
    """Train (``--train``) or load (``--weights``) a teacher and print its score and MA-gradient errors."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=0, help="train this many steps (else --weights)")
    p.add_argument("--objective", default="regression", choices=["regression", "fm"])
    p.add_argument("--out", default="", help="safetensors file written at every checkpoint (step in the name)")
    p.add_argument("--weights", default="", help="load a trained teacher")
    p.add_argument("--t-min", type=float, default=0.05)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    analytic = gmm4()
    if args.train:
        from safetensors.torch import save_file

        tic = time.perf_counter()

        def ckpt(step: int, net: FlowMap) -> None:
            if args.out:
                path = Path(args.out)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(net.state_dict(), str(path.with_name(f"{path.stem}_{step}{path.suffix}")))
            print(f"step {step} ({time.perf_counter() - tic:.0f} s)", flush=True)

        net = train_velocity_teacher(analytic, args.train, args.objective, checkpoint=ckpt).double()
    else:
        net = load_velocity_net(args.weights)
    learned = ModuleTeacher.from_flowmap(net).eval()
    print("| t | score error (%) |\n|---|---|")
    for t in (args.t_min, 0.1, 0.2, 0.3, 0.5, 0.8):
        print(f"| {t} | {100 * score_error(learned, analytic, t, args.t_min):.1f} |")
    student = perturbed(net)
    print("\n| window | MA gradient difference, learned vs analytic score (%) |\n|---|---|")
    for ts, te in ((1.0, 0.5), (0.5, 0.0), (1.0, 0.0)):
        d = ma_grad_difference(student, learned, analytic, ts, te, t_min=args.t_min, mode="exact", substeps=4)
        print(f"| [{te}, {ts}] | {100 * d:.1f} |", flush=True)
    print("\n| window | RK4 sub-steps M | MA gradient error vs M = 32 (%) |\n|---|---|---|")
    for ts, te in ((1.0, 0.5), (0.5, 0.0), (1.0, 0.0)):
        for m in (1, 2, 4, 8):
            e = substep_error(student, analytic, ts, te, m, t_min=args.t_min)
            print(f"| [{te}, {ts}] | {m} | {100 * e:.2f} |", flush=True)


if __name__ == "__main__":
    main()
