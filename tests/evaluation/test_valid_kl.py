"""evaluate_flowmap / evaluate_velocity_solver report fold_fraction and E_q[p/q] beside KL/TV, and replace the
change-of-variables KL/TV by the density-free estimates for a folding map."""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.evaluation.evaluate import evaluate_flowmap, evaluate_velocity_solver
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _folding(x: Tensor, t, s, cond=None) -> Tensor:  # x_1 - 2 sin x_1 folds on |x_1| < pi/3 (70 % of N(0, 1))
    return torch.cat([2 * (x[:, :1] - 2 * torch.sin(x[:, :1])), 2 * x[:, 1:]], 1)


def _injective(x: Tensor, t, s, cond=None) -> Tensor:
    return 2 * x


def test_folding_student_gets_density_free_kl_and_failed_check() -> None:
    teacher = load_preset("ring8")
    bad = evaluate_flowmap(_folding, teacher, nfe=(1,), n=600)[1]
    # the fold is detected by the sign; E_q[p/q] is only a necessary check (far from p it can stay below 1)
    assert 0.6 < bad["fold_fraction"] < 0.8 and bad["w_se"] > 0
    assert bad["kl_from_cov"] == 0.0 and bad["kl"] == bad["kl_knn"] and bad["tv"] == bad["tv_knn"]
    good = evaluate_flowmap(_injective, teacher, nfe=(1,), n=600)[1]
    assert good["fold_fraction"] == 0.0 and good["w_ok"] == 1.0 and good["kl_from_cov"] == 1.0
    assert abs(good["kl"] - good["kl_knn"]) < 0.1 + 3 * good["kl_knn_se"]  # both routes agree without folds
    assert {"kl_knn_floor", "tv_knn_floor"} <= set(good)


def test_solver_steps_are_checked_for_folds() -> None:
    teacher = load_preset("aniso3")
    euler = evaluate_velocity_solver(teacher, teacher, "euler", 8, n=600)
    assert euler["fold_fraction"] == 0.0 and euler["kl_from_cov"] == 1.0 and euler["w_ok"] == 1.0
    adaptive = evaluate_velocity_solver(teacher, teacher, "dopri5", n=600)
    assert adaptive["w_mean"] == adaptive["w_mean"] and abs(adaptive["w_mean"] - 1) < 0.01  # exact density


def test_diagnose_tv_flags_folding_windows() -> None:
    from fewstep.evaluation.diagnose import diagnose_tv, format_tv_table

    teacher = load_preset("ring8")
    res = diagnose_tv(_folding, teacher, 1, n=600, verbose=False)
    term = res["terms"][0]
    assert 0.6 < term["fold_fraction"] < 0.8 and term["kl_from_cov"] == 0.0 and 0 < term["eps_floor"] < term["eps"]
    assert 0.6 < res["final_fold_fraction"] < 0.8 and res["valid"]  # a second draw of the noise
    assert "k-NN (TV floor" in format_tv_table(res)
    ok = diagnose_tv(_injective, teacher, 1, n=600, verbose=False)
    assert ok["terms"][0]["fold_fraction"] == 0.0 and ok["terms"][0]["kl_from_cov"] == 1.0
