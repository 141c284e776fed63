r"""Tests added to kill mutants of methods/shortcut.py (tools/mutation.py): the loss against its equation.

Bootstrap rows (the first round(f B)): level :math:`k = \lfloor u_{sel} L\rfloor`, step :math:`2d = 2^{-k}`,
:math:`t = (\lfloor u_t 2^k\rfloor + 1)\,2d`, target :math:`\tfrac12[F^-(x_t,t,t-d) + F^-(x', t-d, t-2d)]`,
:math:`x' = x_t - d F^-(x_t,t,t-d)` (at the finest level the half steps use F(., tau, tau)); flow-matching rows:
t uniform on [lo, 1], target v (teacher or x1 - x0), s = t (or t - d_min); :math:`L = E\|F(x_t,t,s,c) - tgt\|^2`.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import random_batch, two_class_teacher
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods.base import U_SELECT, U_T
from fewstep.methods.shortcut import shortcut_target
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
DT = torch.float64
N = 16


class _Probe(nn.Module):
    """F(x, t, s, c) = a x + b t + d s + e c + k c t (c: label, None = 0)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.a, self.b, self.d, self.e, self.k = (nn.Parameter(torch.tensor(v * scale, dtype=DT))
                                                  for v in (0.3, -0.7, 0.4, 0.5, 0.8))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = torch.zeros_like(t) if cond is None else cond.to(x.dtype)
        return self.a * x + (self.b * t + self.d * s + self.e * lab + self.k * lab * t)[:, None]


def _teacher() -> GaussianMixtureTeacher:
    return two_class_teacher(DT)


def _batch() -> Batch:
    return random_batch(N, 6, DT)


def _target(net: nn.Module, x: Tensor, t: Tensor, d: Tensor, finest: Tensor, cond: Tensor, clip: float) -> Tensor:
    mid, end = (t - d).clamp(min=0), (t - 2 * d).clamp(min=0)
    s1, s2 = torch.where(finest, t, mid), torch.where(finest, mid, end)
    f1 = net(x, t, s1, cond)
    f2 = net(x - d[:, None] * f1, mid, s2, cond)
    out = 0.5 * (f1 + f2)
    return out.clamp(-clip, clip) if clip > 0 else out


def _expected(net: nn.Module, tnet: nn.Module, b: Batch, nb: int, levels: int, fm_at_dmin: bool, clip: float,
              teacher: GaussianMixtureTeacher | None) -> Tensor:
    """Per-row squared error of the shortcut loss written out from its equation."""
    d_min = 2.0**-levels
    u, cond = b.u, b.cond
    k = (u[:nb, U_SELECT] * levels).long().clamp(max=levels - 1)
    two_d = 2.0 ** (-k.to(DT))
    t_b = (((u[:nb, U_T] * 2.0 ** k.to(DT)).floor() + 1) * two_d).clamp(max=1.0)
    lo = d_min if fm_at_dmin else 0.0
    t_f = lo + (1 - lo) * u[nb:, U_T]
    t = torch.cat([t_b, t_f])
    x_t = (1 - t)[:, None] * b.x0 + t[:, None] * b.x1
    with torch.no_grad():
        v = teacher.velocity(x_t[nb:], t_f, cond[nb:], 2.0) if teacher is not None else (b.x1 - b.x0)[nb:]
        finest = torch.zeros(nb, dtype=torch.bool) if fm_at_dmin else 0.5 * two_d <= d_min * 1.0001
        tgt_b = _target(tnet, x_t[:nb], t_b, 0.5 * two_d, finest, cond[:nb], clip)
    s = torch.cat([t_b - two_d, t_f - d_min if fm_at_dmin else t_f]).clamp(min=0)
    return ((net(x_t, t, s, cond) - torch.cat([tgt_b, v])) ** 2).sum(1)


@pytest.mark.parametrize(("target", "fm_at_dmin", "clip"), [("data", False, 0.0), ("teacher", False, 0.3),
                                                            ("data", True, 10.0)])
def test_loss_is_the_shortcut_equation(target: str, fm_at_dmin: bool, clip: float) -> None:
    cls = get_method("shortcut")
    net = _Probe()
    teacher = _teacher() if target == "teacher" else None
    m = cls(FlowMap(net, "average_velocity"), teacher,
            cls.make_config(bootstrap_fraction=0.5, levels=3, target=target, target_clip=clip, fm_at_dmin=fm_at_dmin,
                            guidance=2.0 if teacher is not None else 1.0))
    with torch.no_grad():  # a target network that differs from the student
        for p in m.target_net.parameters():
            p.mul_(0.5)
    b = _batch()
    err = _expected(net, _Probe(0.5), b, 8, 3, fm_at_dmin, clip, teacher)
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, err.mean(), rtol=1e-9, atol=1e-12)
    assert logs["fm"] == pytest.approx(float(err[8:].mean()), rel=1e-9)
    assert logs["bootstrap"] == pytest.approx(float(err[:8].mean()), rel=1e-9)
    assert logs["loss"] == pytest.approx(float(err.mean()), rel=1e-9)


def test_one_bootstrap_row_and_uniforms_at_one() -> None:
    """u = 1 (closed end) stays on the coarsest level and at t <= 1; a single bootstrap row is trained and logged."""
    cls = get_method("shortcut")
    net = _Probe()
    m = cls(FlowMap(net, "average_velocity"), None, cls.make_config(bootstrap_fraction=1 / N, levels=3, target="data"))
    b = _batch()
    b.u[0, U_SELECT], b.u[0, U_T] = 1.0, 1.0
    err = _expected(net, _Probe(), b, 1, 3, False, 10.0, None)
    loss, logs = m.loss("student", b, 0)
    torch.testing.assert_close(loss, err.mean(), rtol=1e-9, atol=1e-12)
    assert logs["bootstrap"] == pytest.approx(float(err[0]), rel=1e-9)


def test_all_bootstrap_or_all_fm_rows_log_zero_for_the_missing_kind() -> None:
    cls = get_method("shortcut")
    for frac, zero in ((1.0, "fm"), (0.0, "bootstrap")):
        m = cls(FlowMap(_Probe(), "average_velocity"), None, cls.make_config(bootstrap_fraction=frac, target="data"))
        _, logs = m.loss("student", _batch(), 0)
        assert logs[zero] == 0.0 and logs["loss"] > 0


def test_shortcut_target_function() -> None:
    net = FlowMap(_Probe(), "average_velocity")
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    t, d, cond = torch.tensor([1.0, 0.5, 0.75, 0.25], dtype=DT), torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=DT), \
        torch.tensor([0, 1, 1, 0])
    finest = torch.tensor([False, False, True, True])
    with torch.no_grad():
        want = _target(net.net, x, t, d, finest, cond, 0.2)
        torch.testing.assert_close(shortcut_target(net, x, t, d, finest, cond, 0.2), want)
        plain = _target(net.net, x, t, d, torch.zeros(4, dtype=torch.bool), cond, 0.0)
        torch.testing.assert_close(shortcut_target(net, x, t, d, cond=cond), plain)
    with pytest.raises(ValueError, match=r"^shortcut_target needs t - 2d >= 0 for every row$"):
        shortcut_target(net, x, t, d + 0.5)


def test_after_update_moves_the_target_by_ema() -> None:
    cls = get_method("shortcut")
    m = cls(FlowMap(_Probe(), "average_velocity"), None, cls.make_config(target="data", target_ema=0.75))
    with torch.no_grad():
        m.student.net.a.fill_(1.3)
    m.after_update("fake", 0)
    assert float(m.target_net.net.a) == pytest.approx(0.3)
    m.after_update("student", 0)
    assert float(m.target_net.net.a) == pytest.approx(0.75 * 0.3 + 0.25 * 1.3)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"bootstrap_fraction": 1.5}, r"^bootstrap_fraction must lie in \[0, 1\]; got 1\.5$"),
    ({"bootstrap_fraction": -0.1}, r"^bootstrap_fraction must lie in \[0, 1\]; got -0\.1$"),
    ({"levels": 0}, r"^levels must be >= 1; got 0$"),
    ({"target": "ema"}, r"^unknown target 'ema'; expected 'teacher' or 'data'$"),
    ({"target_ema": 1.0}, r"^target_ema must lie in \[0, 1\); got 1\.0$"),
    ({"target_ema": -0.1}, r"^target_ema must lie in \[0, 1\); got -0\.1$"),
    ({"target_clip": -1.0}, r"^target_clip must be >= 0; got -1\.0$"),
])
def test_config_refusals_by_message(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        get_method("shortcut").make_config(**kw)


def test_construction_refusals_and_boundaries() -> None:
    cls = get_method("shortcut")
    for kw in ({"bootstrap_fraction": 0.0}, {"bootstrap_fraction": 1.0}, {"levels": 1}, {"target_ema": 0.0},
               {"target_clip": 0.0}):
        cls.make_config(**kw)
    with pytest.raises(ValueError, match=r"^shortcut with target='teacher' needs a teacher; use target='data' to "
                                         r"train from data$"):
        cls(FlowMap(_Probe(), "average_velocity"), None, cls.make_config())
    with pytest.raises(ValueError, match=r"^shortcut trains an 'average_velocity' student; got 'velocity'$"):
        cls(FlowMap(_Probe(), "velocity"), _teacher(), cls.make_config())
    assert cls.uses_teacher(cls.make_config()) and not cls.uses_teacher(cls.make_config(target="data"))
    m = cls(FlowMap(_Probe(), "average_velocity"), None, cls.make_config(target="data"))
    b = _batch()
    with pytest.raises(ValueError, match=r"^shortcut needs data batches \(x0\) to form x_t = \(1-t\) x0 \+ t x1$"):
        m.loss("student", Batch(x1=b.x1, u=b.u), 0)


def test_student_without_parameterization_is_accepted() -> None:
    class _Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Probe()

        def F(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:  # noqa: N802
            return self.net(x, t, s, cond)

    cls = get_method("shortcut")
    m = cls(_Bare(), None, cls.make_config(target="data"))
    assert m.target_net is not m.student
