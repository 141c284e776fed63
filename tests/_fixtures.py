"""Shared test fixtures: exact-teacher students, small class-conditional teachers and batches."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.networks.mlp import MLP, SinusoidalEmbedding
from fewstep.teachers import GaussianMixtureTeacher, TeacherFlowMap


class ExactNet(nn.Module):
    r"""Exact average velocity of a teacher: :math:`F(x,t,s) = (x - \Phi_{t\to s}(x))/(t-s)`, v(x,t) at s = t."""

    def __init__(self, teacher: nn.Module, tol: float = 1e-9, offset: float = 0.0) -> None:
        super().__init__()
        self.teacher, self.offset = teacher, offset
        self.flow = TeacherFlowMap(teacher.velocity, rtol=tol, atol=tol)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        gap = (t - s)[:, None]
        same = gap.abs() < 1e-12
        phi = self.flow(x, t, s, cond)
        avg = (x - phi) / torch.where(same, torch.ones_like(gap), gap)
        return torch.where(same, self.teacher.velocity(x, t, cond), avg) + self.offset


def make_batch(teacher: nn.Module, n: int, seed: int, dtype: torch.dtype = torch.float64) -> Batch:
    """Exact teacher samples x0, noise x1 and uniforms u from one generator."""
    g = torch.Generator().manual_seed(seed)
    x0 = teacher.sample(n, generator=g, dtype=dtype)
    return Batch(x1=torch.randn(x0.shape, generator=g, dtype=dtype), u=torch.rand(n, 8, generator=g, dtype=dtype),
                 x0=x0)


def small_teacher() -> GaussianMixtureTeacher:
    """Two classes, one Gaussian each: class 0 at (1.5, 0.5), class 1 at (-1.5, -0.5), std 0.3."""
    means = torch.tensor([[1.5, 0.5], [-1.5, -0.5]])
    return GaussianMixtureTeacher([0.5, 0.5], means, 0.09 * torch.eye(2).expand(2, 2, 2), classes=[0, 1])


def ring_teacher() -> GaussianMixtureTeacher:
    """Four components on a circle of radius 2 (std 0.2); class k = components {k, k+2}."""
    ang = torch.arange(4) * math.pi / 2
    means = 2 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixtureTeacher([0.25] * 4, means, 0.04 * torch.eye(2).expand(4, 2, 2), classes=[0, 1, 0, 1])


class TeacherAsFake(nn.Module):
    """A 'fake score' that is exactly the real teacher's conditional velocity (plus optional scale/bias)."""

    def __init__(self, teacher: GaussianMixtureTeacher, guidance: float = 1.0) -> None:
        super().__init__()
        self.teacher, self.guidance = teacher, guidance
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(2))

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.scale * self.teacher.velocity(x, t, cond=cond, guidance=self.guidance) + self.bias


def student_net(num_classes: int | None = 2, param: str = "consistency") -> FlowMap:
    """A tiny conditional MLP student (the network does not see s)."""
    return FlowMap(MLP(2, hidden=32, depth=2, num_classes=num_classes, use_s=False), param)


def spread_split_fake(method: nn.Module) -> nn.Module:
    """Make the copies of a DM method's split fake score differ (copy k moved by 0.05 k N(0, 1) per weight), so a
    wrong routing of anchors to copies changes the numbers; a method without a split fake is left as it is."""
    from fewstep.methods._shared.split_fake import SplitFake

    if isinstance(method.fake, SplitFake):
        with torch.no_grad():
            for k, c in enumerate(method.fake.copies):
                for p in c.parameters():
                    p.add_(0.05 * k * torch.randn_like(p))
    return method


def class_batch(n: int = 64, seed: int = 0, classes: int = 2) -> Batch:
    """Noise, uniforms and random class labels (data-free batch)."""
    g = torch.Generator().manual_seed(seed)
    return Batch(x1=torch.randn(n, 2, generator=g), u=torch.rand(n, 8, generator=g),
                 cond=torch.randint(0, classes, (n,), generator=g))


def assert_losses_finite(method: nn.Module, uvals: tuple[float, ...] = (0.0, 0.999999), n: int = 32) -> None:
    """For each constant uniform value u (all batch.u = u, e.g. at the clamped time boundaries), every network the
    method trains ('fake' and 'student') has a finite loss, finite logs and finite parameter gradients."""
    for uval in uvals:
        b = class_batch(n)
        b.u = torch.full_like(b.u, uval)
        for net in ("fake", "student"):
            loss, logs = method.loss(net, b, 0)
            loss.backward()
            assert math.isfinite(float(loss.detach())) and all(math.isfinite(v) for v in logs.values()), (uval, net)
            assert all(bool(torch.isfinite(p.grad).all()) for p in method.parameters() if p.grad is not None)


def exact_student(teacher: nn.Module, parameterization: str = "average_velocity", offset: float = 0.0) -> FlowMap:
    """A FlowMap whose backbone is the exact teacher average velocity (plus a constant ``offset``)."""
    return FlowMap(ExactNet(teacher, offset=offset), parameterization)


def gaussian_teacher() -> GaussianMixtureTeacher:
    """A single anisotropic 2-D Gaussian: smooth, exactly known flow map (the "small problem" of the tests)."""
    return GaussianMixtureTeacher([1.0], [[1.0, -0.5]], [[[0.5, 0.2], [0.2, 0.3]]]).double()


def train_and_measure(name: str, steps: int = 150, seed: int = 0, lr: float = 1e-3,
                      **cfg: object) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Train a small MLP student with method ``name`` on a 2-D Gaussian teacher (Adam, batch 256, float64).

    The MLP's time embeddings use max_freq = 1: with the default max_freq = 32 (|d emb/dt| up to 2*pi*32) the
    JVP targets of MeanFlow / sCM / AYF grow during training (see docs/results/flowmap_a.md).

    Returns (error before, error after, mean logs of the first 10 steps, of the last 10). The error is the mean
    squared distance of F from the exact average velocity on a fixed set of jumps: (t, s) with t - s in
    [0, 0.3] for average-velocity students, (t, 0) with t in [0.05, 0.35] for consistency students.
    """
    teacher = gaussian_teacher()
    cls = get_method(name)
    torch.manual_seed(seed)
    net = MLP(2, hidden=64, depth=2, use_s=True)
    net.t_emb, net.h_emb = SinusoidalEmbedding(64, max_freq=1.0), SinusoidalEmbedding(64, max_freq=1.0)
    student = FlowMap(net, cls.parameterization).double()
    method = cls(student, teacher, cls.make_config(**cfg))
    g = torch.Generator().manual_seed(1000 + seed)
    n = 128
    if cls.parameterization == "consistency":
        t = 0.05 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
        s = torch.zeros_like(t)
    else:
        t = 0.3 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
        s = t - 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    x = teacher.sample(n, t=0.0, generator=g, dtype=torch.float64)
    x_t = (1 - t)[:, None] * x + t[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = ExactNet(teacher, tol=1e-8)(x_t, t, s)

    def error() -> float:
        with torch.no_grad():
            return float(((student.F(x_t, t, s) - exact) ** 2).sum(1).mean())

    before = error()
    opts = {k: torch.optim.Adam(v.parameters(), lr=lr) for k, v in method.trainable().items()}
    history: list[dict[str, float]] = []
    for step in range(steps):
        for nm in method.schedule(step):
            loss, logs = method.loss(nm, make_batch(teacher, 256, seed=10_000 * seed + step), step)
            opts[nm].zero_grad()
            loss.backward()
            opts[nm].step()
            if nm == "student":
                history.append(logs)

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    return before, error(), mean(history[:10]), mean(history[-10:])
