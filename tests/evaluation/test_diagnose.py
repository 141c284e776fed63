"""The telescoping-TV diagnostic: zero for the exact teacher map, the bound holds, closed-form one-window TV."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep.core.flowmap import VelocityFlowMap
from fewstep.evaluation.diagnose import diagnose_tv, main_tv
from fewstep.teachers import GaussianMixtureTeacher, TeacherFlowMap
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def test_exact_teacher_map_has_zero_terms() -> None:
    ring8 = load_preset("ring8")
    res = diagnose_tv(TeacherFlowMap(ring8, method="rk4", steps=24), ring8, 2, n=800, seed=0, verbose=False)
    assert all(t["eps"] < 0.01 and abs(t["kl"]) < 0.01 for t in res["terms"])
    assert res["tv_final"] < 0.01 and res["holds"]


def test_bound_holds_for_euler_teacher_student() -> None:
    """The teacher velocity taken as a 4-step Euler student: local terms positive, bound and Pinsker ordering hold."""
    ring8 = load_preset("ring8")
    euler = VelocityFlowMap(lambda x, t, cond=None: ring8.velocity(x, t))
    res = diagnose_tv(euler, ring8, 4, n=1000, seed=1, verbose=False)
    assert res["tv_final"] > 0.2
    assert res["holds"] and res["tv_final"] <= res["sum_eps"] + 0.05
    assert res["sum_eps"] <= res["sum_sqrt_kl_half"] + 0.05


class Shift(nn.Module):
    """f_{t->s}(x) = x + c (t - s): a translation by c over the unit window."""

    def __init__(self, c: Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        ss = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
        return x + self.c * (tt - ss)


def test_one_window_tv_matches_closed_form() -> None:
    """Data N(0, I): p_1 = p_0 = N(0, I). One window [0, 1] with a translation by c gives
    TV(N(c, I), N(0, I)) = 2 Phi(|c|/2) - 1 and KL = |c|^2 / 2."""
    g = GaussianMixtureTeacher([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]])
    c = torch.tensor([0.8, 0.0], dtype=torch.float64)
    res = diagnose_tv(Shift(c), g, 1, n=20000, seed=2, verbose=False)
    tv = math.erf(0.8 / 2 / math.sqrt(2))  # 2 Phi(a) - 1 = erf(a / sqrt 2)
    assert abs(res["terms"][0]["eps"] - tv) < 0.02
    assert abs(res["terms"][0]["kl"] - 0.32) < 0.03  # |c|^2 / 2
    assert abs(res["tv_final"] - tv) < 0.02


def test_errors_and_cli_parser(tmp_path) -> None:
    ring8 = load_preset("ring8")
    with pytest.raises(ValueError, match="mode"):
        diagnose_tv(TeacherFlowMap(ring8), ring8, 2, mode="fisher")
    with pytest.raises(ValueError, match="analytic teacher"):
        diagnose_tv(TeacherFlowMap(ring8), object(), 2)
    with pytest.raises(ValueError, match="decreasing grid"):
        diagnose_tv(TeacherFlowMap(ring8), ring8, [0.5, 1.0])
    with pytest.raises(FileNotFoundError):
        main_tv(["tv", "--run", str(tmp_path)])
