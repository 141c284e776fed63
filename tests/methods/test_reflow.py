"""Reflow and reflow_distill: the correct zero-loss identities, MA wiring, loss decrease, under-determination."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.methods import get_method
from fewstep.methods._shared.pairs import PairSolver, generate_pairs
from fewstep.methods.base import Batch
from fewstep.networks.mlp import MLP
from fewstep.teachers import GaussianMixtureTeacher, TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def make(name: str, teacher: nn.Module, param: str = "velocity", **cfg: object):
    cls = get_method(name)
    net = MLP(2, 64, 2, emb_dim=16, use_s=param == "average_velocity")
    return cls(FlowMap(net, param), teacher, cls.make_config(**cfg))


def batch(n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(x1=torch.randn(n, 2, generator=g), u=torch.rand(n, 8, generator=g))


def train(method, steps: int, lr: float = 3e-3, n: int = 256) -> list[float]:
    opt = torch.optim.Adam(method.student.parameters(), lr=lr)
    out = []
    for step in range(steps):
        loss, logs = method.loss("student", batch(n, step), step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.student.parameters(), 1.0)
        opt.step()
        out.append(logs)
    return out


class ExactOneStep(nn.Module):
    """The teacher's exact flow map f_{t->s} as an 'average_velocity' student (the +distill optimum)."""

    parameterization = "average_velocity"

    def __init__(self, teacher: nn.Module, solver: PairSolver) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.map = TeacherFlowMap(teacher, method=solver.method, steps=solver.steps)

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Tensor | None = None) -> Tensor:
        return self.map(x, t, s) + 0 * self.dummy


def test_distill_loss_vanishes_for_exact_teacher_flow_map() -> None:
    ring8 = load_preset("ring8")
    solver = PairSolver("rk4", 16)
    m = get_method("reflow_distill")(ExactOneStep(ring8, solver), ring8,
                                    get_method("reflow_distill").make_config(n_pairs=256, pair_solver="rk4",
                                                                             pair_steps=16))
    m.prepare({"progress": False})
    loss, _ = m.loss("student", batch(128, 0), 0)
    assert float(loss.detach()) < 1e-10


def test_fm_on_pairs_identity(tmp_path) -> None:
    """FM-on-pairs is minimised by E[x1 - x0 | x_t]: zero for a Gaussian (straight, non-crossing coupling),
    strictly positive for the teacher velocity of a mixture (curved trajectories)."""
    m_, sd = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.7, 0.3], dtype=torch.float64)
    gauss = GaussianMixtureTeacher([1.0], m_[None], torch.diag(sd**2)[None])
    # for N(m, diag(sd^2)) the teacher ODE maps x1 -> m + sd * x1, so E[x1 - x0 | x_t] is known in closed form
    def straight(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 - sd) * (x - (1 - t[:, None]) * m_) / ((1 - t[:, None]) * sd + t[:, None]) - m_

    pairs = generate_pairs(gauss, tmp_path / "gauss", 512, PairSolver("rk4", 32), progress=False)
    assert torch.allclose(pairs.x0.double(), m_ + sd * pairs.x1.double(), atol=1e-5)
    t = torch.rand(512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1, x0 = pairs.x1.double(), pairs.x0.double()
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    assert float(((straight(x_t, t) - (x1 - x0)) ** 2).mean()) < 1e-9
    ring8 = load_preset("ring8")
    rp = generate_pairs(ring8, tmp_path / "ring8", 512, PairSolver("rk4", 32), progress=False)
    x1, x0 = rp.x1.double(), rp.x0.double()
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    loss_teacher = float(((ring8.velocity(x_t, t) - (x1 - x0)) ** 2).mean())
    assert loss_teacher > 0.05  # the teacher's curved field is not the rectified (straight) field


def test_reflow_loss_falls_and_ma_is_logged() -> None:
    ring8 = load_preset("ring8")
    m = make("reflow", ring8, n_pairs=2048, pair_solver="rk4", pair_steps=16, ma_weight=0.01, ma_batch=64,
             ma_t_min=0.05)
    m.prepare({"progress": False})
    logs = train(m, 120)
    first = sum(row["loss_fm"] for row in logs[:10]) / 10
    last = sum(row["loss_fm"] for row in logs[-10:]) / 10
    assert last < 0.8 * first
    assert "ma_kl" in logs[-1] and math.isfinite(logs[-1]["ma_kl"])


def test_ma_descent_reduces_window_kl() -> None:
    """Gradient steps on lambda * L_MA alone (fixed samples) lower the sample estimate of the window KL."""
    from fewstep.methods._shared.alignment import ma_loss

    ring8 = load_preset("ring8")
    torch.manual_seed(0)
    student = FlowMap(MLP(2, 32, 2, emb_dim=16, use_s=False), "velocity").double()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    kls = []
    for _ in range(15):
        res = ma_loss(student, ring8, x, 1.0, 0.0, t_min=0.1)
        kls.append(float(res.kl))
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    assert kls[-1] < 0.8 * kls[0], kls


def test_reflow_distill_loss_falls_and_config_errors() -> None:
    ring8 = load_preset("ring8")
    m = make("reflow_distill", ring8, "average_velocity", n_pairs=1024, pair_solver="rk4", pair_steps=8)
    m.prepare({"progress": False})
    logs = train(m, 150, lr=1e-2)
    assert sum(row["loss_pair"] for row in logs[-10:]) < 0.5 * sum(row["loss_pair"] for row in logs[:10])
    with pytest.raises(ValueError, match="unknown config key"):
        get_method("reflow").make_config(ma_wieght=1.0)
    with pytest.raises(ValueError, match="ma_mode"):
        make("reflow", ring8, ma_mode="fisher")
    with pytest.raises(ValueError, match="average_velocity or consistency"):
        make("reflow_distill", ring8, "velocity")


def test_underdetermination_construction() -> None:
    from fewstep.benchmarks.reflow_underdetermination import rotation_vs_translation

    r = rotation_vs_translation(alpha=math.pi / 3, n=20000, seed=0)
    expected = 4 * (1 - math.cos(math.pi / 3))
    assert abs(r["traj_loss_rotation"] - expected) < 0.05 * expected
    assert abs(r["traj_loss_translation"] - expected) < 0.05 * expected
    assert abs(r["kl_rotation"]) < 0.01
    assert abs(r["kl_translation"] - expected / 2) < 0.03


def test_k_rectified_flow_uses_previous_student_as_teacher() -> None:
    """3-RF: the teacher is a (here untrained) reflow student; pairs solve its velocity ODE; MA can target the
    original teacher through ``score_teacher``."""
    from fewstep.sampling.samplers import solve

    torch.manual_seed(0)
    prev = FlowMap(MLP(2, 16, 1, emb_dim=8, use_s=False), "velocity")
    m = make("reflow", prev, n_pairs=64, pair_solver="rk4", pair_steps=8, ma_weight=0.01, ma_batch=16)
    m.prepare({"progress": False})
    assert m.pairs is not None and m.pairs.manifest["teacher"]["class"] == "FlowMap"
    with torch.no_grad():
        ref = solve(lambda x, t, cond=None: prev.velocity(x, t, cond), m.pairs.x1, 8, method="rk4").x
    assert torch.allclose(m.pairs.x0, ref, atol=1e-5)
    ring8 = load_preset("ring8")
    m.set_score_teacher(ring8)
    assert "score_teacher" not in dict(m.named_modules())
    loss, logs = m.loss("student", batch(32, 0), 0)
    assert math.isfinite(float(loss.detach())) and "ma_kl" in logs  # KL only available via the analytic target
