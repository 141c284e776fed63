r"""Tests added to kill mutants of methods/consistency.py (tools/mutation.py): the loss against its equation.

:math:`L = E[w\,d(f_\theta(x_t, t\to0, c),\ f_{\theta^-}(x_{t'}, t'\to0, c))]` with
:math:`d(a, b) = \sqrt{\|a-b\|^2 + c^2} - c` (pseudo-Huber) or :math:`\|a-b\|^2`, :math:`w = 1` or
:math:`1/(t-t')`; cd: :math:`x_{t'}` one Euler or Heun step of the teacher (guided), ct: the same (x0, x1) at t'.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import batch_velocity_by_hand, random_batch, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.base import U_T
from fewstep.methods.consistency import consistency_grid, curriculum_length, discretization_steps, pseudo_huber
from fewstep.sampling.samplers import time_grid
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
DT = torch.float64
N = 16


class _Probe(nn.Module):
    """F(x, t, s, c) = a x + b t + e c (c: label, None = 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.e = (nn.Parameter(torch.tensor(v, dtype=DT)) for v in (0.3, -0.7, 0.5))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.e * lab)[:, None]


def _teacher() -> GaussianMixtureTeacher:
    return two_class_teacher(DT)


def _batch() -> Batch:
    return random_batch(N, 8, DT)


def test_pseudo_huber_value() -> None:
    a, b = torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(pseudo_huber(a, b, 0.5), torch.tensor([math.sqrt(25.25) - 0.5, 0.0]))


@pytest.mark.parametrize(("name", "solver", "distance", "weighting", "jitter"), [
    ("cd", "heun", "pseudo_huber", "uniform", False), ("cd", "euler", "l2", "inv_dt", True),
    ("ct", "heun", "pseudo_huber", "inv_dt", False), ("ct", "heun", "l2", "uniform", True)])
def test_loss_is_the_consistency_equation(name: str, solver: str, distance: str, weighting: str,
                                          jitter: bool) -> None:
    cls = get_method(name)
    teacher = _teacher() if name == "cd" else None
    m = cls(FlowMap(_Probe(), "consistency"), teacher,
            cls.make_config(solver=solver, distance=distance, huber_c=0.2, weighting=weighting, n_steps=4,
                            grid_jitter=jitter, guidance=2.0))
    with torch.no_grad():
        m.target.net.a.mul_(0.5)  # a target network that differs from the student
    b = _batch()
    u, n = b.u[:, U_T], 4
    if jitter:  # uniform grid: G(c) = c / n
        t, tp = u, ((u * n - 1).clamp(min=0)) / n
    else:
        i = (u * n).long().clamp(0, n - 1) + 1
        t, tp = i.to(DT) / n, (i - 1).to(DT) / n
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    with torch.no_grad():
        if name == "ct":
            xp = (1 - tp)[:, None] * b.x0 + tp[:, None] * b.x1
        else:
            h = (t - tp)[:, None]
            v = teacher.velocity(x_t, t, b.cond, 2.0)
            xe = x_t - h * v
            xp = xe if solver == "euler" else x_t - 0.5 * h * (v + teacher.velocity(xe, tp, b.cond, 2.0))
        tgt = m.target(xp, tp, torch.zeros_like(tp), b.cond)
    pred = m.student(x_t, t, torch.zeros_like(t), b.cond)
    sq = ((pred - tgt) ** 2).sum(1)
    d = sq if distance == "l2" else torch.sqrt(sq + 0.04) - 0.2
    w = 1 / (t - tp) if weighting == "inv_dt" else torch.ones_like(t)
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, (w * d).mean(), rtol=1e-9, atol=1e-12)
    assert logs["distance"] == pytest.approx(float(d.mean()), rel=1e-9) and logs["N"] == 4.0


def test_ict_curriculum_and_edm_grid() -> None:
    cfg = get_method("ct").make_config(n_schedule="ict", n_min=10, n_max=80, curriculum_steps=400)
    k = math.floor(400 / (math.log2(8) + 1))
    assert [discretization_steps(s, cfg) for s in (0, k - 1, k, 3 * k, 10 * k)] == [10, 10, 20, 80, 80]
    assert discretization_steps(999, get_method("ct").make_config(n_steps=7)) == 7


def test_after_update_is_ema_of_the_student() -> None:
    m = get_method("ct")(FlowMap(_Probe(), "consistency"), None, get_method("ct").make_config(target_ema=0.8))
    with torch.no_grad():
        m.student.net.a.fill_(1.3)
    m.after_update("fake", 0)
    assert float(m.target.net.a) == pytest.approx(0.3)
    m.after_update("student", 0)
    assert float(m.target.net.a) == pytest.approx(0.8 * 0.3 + 0.2 * 1.3)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"distance": "l1"}, r"^unknown distance 'l1'; expected one of \('l2', 'pseudo_huber'\)$"),
    ({"weighting": "snr"}, r"^unknown weighting 'snr'; expected one of \('uniform', 'inv_dt'\)$"),
    ({"n_schedule": "cosine"}, r"^unknown n_schedule 'cosine'; expected 'fixed' or 'ict'$"),
    ({"solver": "rk4"}, r"^unknown solver 'rk4'; expected 'euler' or 'heun'$"),
    ({"grid": "karras"}, r"^unknown grid 'karras'; expected 'uniform' or 'edm'$"),
    ({"target_ema": 1.0}, r"^target_ema must lie in \[0, 1\); got 1\.0$"),
    ({"target_ema": -0.5}, r"^target_ema must lie in \[0, 1\); got -0\.5$"),
    ({"n_steps": 0}, r"^need n_steps >= 1 and 1 <= n_min <= n_max; got 0, 10, 640$"),
    ({"n_min": 0}, r"^need n_steps >= 1 and 1 <= n_min <= n_max; got 16, 0, 640$"),
    ({"n_min": 20, "n_max": 10}, r"^need n_steps >= 1 and 1 <= n_min <= n_max; got 16, 20, 10$"),
    ({"huber_c": 0.0}, r"^huber_c must be positive; got 0\.0$"),
])
def test_config_refusals_by_message(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        get_method("ct").make_config(**kw)


def test_boundaries_accepted_and_data_needed() -> None:
    cls = get_method("ct")
    for kw in ({"target_ema": 0.0}, {"n_steps": 1, "n_min": 1, "n_max": 1}):
        cls.make_config(**kw)
    m = cls(FlowMap(_Probe(), "consistency"), None, cls.make_config())
    b = _batch()
    with pytest.raises(ValueError, match=r"^ct needs data batches \(x0\) to form x_t = \(1-t\) x0 \+ t x1$"):
        m.loss("student", Batch(x1=b.x1, u=b.u), 0)


def _times_ref(u: Tensor, g: Tensor, jitter: bool) -> tuple[Tensor, Tensor]:
    """(t_i, t_{i-1}) by hand: grid points i = floor(uN) + 1, or G(c), G(max(c - 1, 0)) with c = uN and G the
    piecewise-linear interpolation of the grid (the last interval for c = N)."""
    n = g.numel() - 1
    if not jitter:
        i = [min(int(float(x) * n), n - 1) + 1 for x in u]
        return g[i], g[[j - 1 for j in i]]

    def G(c: float) -> float:
        j = min(int(math.floor(c)), n - 1)
        return float(g[j] + (c - j) * (g[j + 1] - g[j]))

    c = [float(x) * n for x in u.double()]
    return (torch.tensor([G(x) for x in c], dtype=DT), torch.tensor([G(max(x - 1, 0.0)) for x in c], dtype=DT))


@pytest.mark.parametrize("jitter", [False, True])
@pytest.mark.parametrize(("grid", "rho"), [("uniform", 7.0), ("edm", 3.0)])
def test_times_on_the_grid_up_to_u_equal_one(jitter: bool, grid: str, rho: float) -> None:
    """Adjacent grid times, jittered or not, on a uniform and a non-uniform (EDM, rho = 3) grid; u = 1 falls in the
    last interval (t = 1); the iCT N of the given step sets the grid."""
    cls = get_method("ct")
    cfg = cls.make_config(n_schedule="ict", n_min=4, n_max=16, curriculum_steps=3, grid=grid, rho=rho,
                          grid_jitter=jitter)
    m = cls(FlowMap(_Probe(), "consistency"), None, cfg)
    u = torch.tensor([0.0, 0.1, 0.2, 0.27, 0.5, 0.74, 0.9, 0.999, 1.0], dtype=DT)
    for step, n in ((0, 4), (1, 8)):  # K' = floor(3 / 3) = 1: N doubles every step
        g = time_grid(n, kind=grid, rho=rho).flip(0)
        t, tp = m.times(u, step)
        t_ref, tp_ref = _times_ref(u, g, jitter)
        torch.testing.assert_close(t, t_ref)
        torch.testing.assert_close(tp, tp_ref)
        assert float(t[-1]) == 1.0


def test_ict_loss_uses_the_step_and_logs_its_n() -> None:
    cls = get_method("ct")
    m = cls(FlowMap(_Probe(), "consistency"), None, cls.make_config(
        n_schedule="ict", n_min=2, n_max=8, curriculum_steps=3, grid_jitter=False, distance="l2"))
    b = _batch()
    for step, n in ((0, 2), (2, 8)):
        _, logs = m.loss("student", b, step)
        assert logs["N"] == float(n)
        t, _ = m.times(b.u[:, U_T], step)
        assert set(t.tolist()) <= set(time_grid(n).tolist())


def test_curriculum_interval_floor_is_one_step() -> None:
    """K' = max(1, floor(K/(log2(n_max/n_min) + 1))): with K = 2 < 3 levels, N doubles every step."""
    cfg = get_method("ct").make_config(n_schedule="ict", n_min=10, n_max=40, curriculum_steps=2)
    assert [discretization_steps(s, cfg) for s in range(4)] == [10, 20, 40, 40]


def test_edm_grid_accepted_and_default_rho_is_seven() -> None:
    assert get_method("ct").make_config(grid="edm").grid == "edm"
    torch.testing.assert_close(consistency_grid(5, "edm"), time_grid(5, kind="edm", rho=7.0).flip(0))
    torch.testing.assert_close(consistency_grid(5, "edm", 3.0), time_grid(5, kind="edm", rho=3.0).flip(0))
    assert float((consistency_grid(5, "edm", 3.0) - consistency_grid(5, "edm")).abs().max()) > 1e-3
    assert consistency_grid(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]



def test_ct_batch_velocity_partner_with_labels_is_the_class_restricted_equation() -> None:
    r"""ct with ``velocity="batch"`` on a labelled batch: :math:`x_{t'} = x_t - (t-t')\hat v(x_t)` with the
    weights over the same-label rows only, and the loss is
    :math:`E\,\|f_\theta(x_t,t) - f_{\theta^-}(x_{t'},t')\|^2`."""
    cls = get_method("ct")
    m = cls(FlowMap(_Probe(), "consistency"), None,
            cls.make_config(distance="l2", n_steps=4, grid_jitter=False, velocity="batch"))
    with torch.no_grad():
        m.target.net.a.mul_(0.5)
    b = _batch()
    assert 0 < int(b.cond.sum()) < N  # both labels present, so the label restriction matters
    t, tp = m.times(b.u[:, U_T], 0)
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    xp = x_t - (t - tp)[:, None] * batch_velocity_by_hand(x_t, t, b.x0, b.cond)
    torch.testing.assert_close(m.partner(x_t, t, tp, b), xp, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        tgt = m.target(xp, tp, torch.zeros_like(tp), b.cond)
    pred = m.student(x_t, t, torch.zeros_like(t), b.cond)
    loss, _ = m.loss("student", b, 0)
    torch.testing.assert_close(loss, ((pred - tgt) ** 2).sum(1).mean(), rtol=1e-9, atol=1e-12)


def test_ct_keeps_the_teacher_it_is_given() -> None:
    """ct needs no teacher, but one given is kept (frozen) like every method's: the benchmarks read it."""
    teacher = _teacher()
    m = get_method("ct")(FlowMap(_Probe(), "consistency"), teacher)
    assert m.teacher is teacher


def test_curriculum_follows_the_prepared_run_length_in_times_and_logs() -> None:
    """With curriculum_fraction, N(k) follows the train.steps handed to prepare: K = 0.5 x 40 = 20 over
    log2(8/2) + 1 = 3 levels, K' = 6; the grid times and the logged N of step k use that N. Before prepare the run
    length is unknown and the loss refuses with the full message."""
    cls = get_method("ct")
    cfg = cls.make_config(n_schedule="ict", n_min=2, n_max=8, curriculum_fraction=0.5, grid_jitter=False,
                          distance="l2")
    m = cls(FlowMap(_Probe(), "consistency"), None, cfg)
    b = _batch()
    assert m.train_steps is None
    msg = ("the iCT curriculum spans curriculum_fraction x train.steps, but the run length is unknown: train through "
           "the Trainer (it calls method.prepare({'steps': ...})) or set curriculum_steps")
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        m.loss("student", b, 0)
    m.prepare({"steps": 40})
    assert m.train_steps == 40 and type(m.train_steps) is int
    for step, n in ((0, 2), (5, 2), (6, 4), (12, 8), (39, 8)):
        assert discretization_steps(step, cfg, 40) == n
        _, logs = m.loss("student", b, step)
        assert logs["N"] == float(n)
        t, _ = m.times(b.u[:, U_T], step)
        assert set(t.tolist()) <= {k / n for k in range(1, n + 1)}
        assert len(set(t.tolist())) > 1 or n == 2
    m.prepare({"steps": 4.0})  # a float step count is taken as an int
    assert m.train_steps == 4 and type(m.train_steps) is int
    m.prepare({})
    assert m.train_steps is None


def test_curriculum_length_floor_and_one_step_curriculum() -> None:
    """K = max(1, round(fraction x steps)) (0.1 x 5 rounds to 0 -> 1, 0.1 x 10 = 1); curriculum_steps = 1 is
    accepted and doubles N every step."""
    cls = get_method("ct")
    frac = cls.make_config(n_schedule="ict", curriculum_fraction=0.1)
    assert curriculum_length(frac, 5) == 1 and curriculum_length(frac, 10) == 1 and curriculum_length(frac, 30) == 3
    one = cls.make_config(n_schedule="ict", n_min=2, n_max=8, curriculum_steps=1)
    assert curriculum_length(one, None) == 1
    assert [discretization_steps(s, one) for s in range(4)] == [2, 4, 8, 8]
