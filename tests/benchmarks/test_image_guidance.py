"""Smoke tests of fewstep.benchmarks.image_guidance on a stub image teacher whose guided ODE is known exactly.

The stub's class-c velocity (x - m_c) / t (null row m_u) moves every noise straight to m_c, so the guided field
v_u + w (v_c - v_u) = (x - m_u - w (m_c - m_u)) / t ends every sample at m_u + w (m_c - m_u), whatever the noise.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fewstep.benchmarks.image_guidance import SEED_A, SEED_B, guided_target, report, target_rows
from fewstep.teachers.module import ModuleTeacher


class _Net(nn.Module):
    event_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("m", torch.rand(11, 1, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        c = torch.full((x.shape[0],), 10) if cond is None else torch.where(cond < 0, 10, cond)
        return (x - self.m[c]) / t.clamp_min(1e-3).view(-1, 1, 1, 1)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_guided_target_ends_at_the_guided_point(w: float) -> None:
    net = _Net()
    x, cond, nfe = guided_target(ModuleTeacher(net), w, n=20, seed=SEED_A, rtol=1e-5)
    m_u, m_c = net.m[10], net.m[cond]
    assert nfe > 2
    torch.testing.assert_close(x, m_u + w * (m_c - m_u), atol=2e-3, rtol=0)


def test_target_rows_separate_guided_from_w1() -> None:
    teacher = ModuleTeacher(_Net())
    targets = {}
    for w in (1.0, 3.0):
        for seed in (SEED_A, SEED_B):
            x, cond, nfe = guided_target(teacher, w, n=30, seed=seed, rtol=1e-4)
            targets[(w, seed)] = {"x": x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)),
                                  "cond": cond, "nfe": nfe}
    rows = {r["w"]: r for r in target_rows("digits8", targets)}
    assert rows[1.0]["fd_to_w1"] == pytest.approx(rows[1.0]["fd_floor"])
    assert rows[3.0]["fd_to_w1"] > 5 * rows[3.0]["fd_floor"]


def _student(method: str, variant: str, w: float, seed: int, guided: float, w1: float, acc: float) -> dict:
    return {"method": method, "variant": variant, "w": w, "seed": seed, "nfe": 1, "fd_guided": guided,
            "fd_w1": w1, "fd": 1.0, "precision": 0.5, "recall": 0.5, "class_acc": acc}


def test_report_says_which_target_is_nearer() -> None:
    students = {}
    for s in range(3):
        students[f"a{s}"] = _student("dmd2", "full", 2.0, s, 10.0 + s, 20.0 + s, 0.9)
        students[f"b{s}"] = _student("cdm", "full", 2.0, s, 30.0 + s, 20.0 - s, 0.8)
        students[f"c{s}"] = _student("cdm", "ca_only", 2.0, s, 40.0 + 2 * s, 25.0, 0.7 + 0.01 * s)
    text = report({"targets": [], "students": students})
    dmd2 = next(line for line in text.splitlines() if line.startswith("| dmd2 | full"))
    cdm = next(line for line in text.splitlines() if line.startswith("| cdm | full"))
    ca = next(line for line in text.splitlines() if line.startswith("| cdm | 2 | ca_only"))
    assert "| guided ODE |" in dmd2 and "| w = 1 |" in cdm
    assert "| +11.00 ± " in ca and "| further |" in ca and "| lower |" in ca


def test_report_marks_the_nearest_guided_w() -> None:
    target = {"nfe": 60, "fd": 1.0, "precision": 0.9, "recall": 0.9, "class_acc": 1.0, "fd_floor": 1.0, "fd_to_w1": 1.0}
    targets = [{"w": w, **target} for w in (1.0, 2.0, 4.0)]
    fd_to = {"1": 50.0, "2": 20.0, "4": 30.0}
    students = {f"r{s}": {**_student("ddmd", "full", 4.0, s, 30.0, 50.0, 1.0), "fd_to": fd_to} for s in range(2)}
    line = next(ln for ln in report({"targets": targets, "students": students}).splitlines()
                if ln.startswith("| ddmd | full | 4 |") and "**" in ln)
    assert line.endswith("| 50.0 | **20.0** | 30.0 |")
