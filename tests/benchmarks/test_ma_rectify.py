"""2-rectified flow in the MA sweep: round 2 takes its pairs from the round-1 student's ODE, starts from its weights
(student and EMA), and aligns MA to the original analytic teacher."""

from __future__ import annotations

import copy
import json

import torch

from fewstep.benchmarks import ma_experiments as ME
from fewstep.benchmarks.ma_rectify import second_round
from fewstep.config.build import build_run
from fewstep.sampling.samplers import solve
from fewstep.teachers.gmm import GaussianMixtureTeacher


def test_second_round_pairs_init_and_score_teacher(tmp_path):
    budget = ME.Budget(steps=2, batch=16, hidden=8, depth=2, n_pairs=64)
    ov = ME.arm_overrides("ring8", ME.Arm("x", 0.01, 0, 2), 0, budget, ME.MA_DEFAULT, "reflow2")
    tr = build_run(ME.arm_config("reflow2", ov, tmp_path / "pairs"), run_dir=None, with_eval=False)
    analytic = tr.method.teacher
    r1 = copy.deepcopy(tr.method.student)
    with torch.no_grad():
        for p in r1.parameters():
            p.add_(0.3 * torch.randn_like(p))
    second_round(r1)(tr)
    tr.prepare()
    m = tr.method
    assert m.score_teacher is analytic and isinstance(analytic, GaussianMixtureTeacher)
    for got, want in zip(m.student.parameters(), r1.parameters(), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(tr.student(ema=True).parameters(), r1.parameters(), strict=True):
        assert torch.equal(got, want)
    x1, x0 = m.pairs.x1, m.pairs.x0
    with torch.no_grad():
        want = solve(lambda x, t, cond=None: r1.velocity(x, t, cond), x1, 64, method="rk4").x
        exact = solve(lambda x, t, cond=None: analytic.velocity(x, t, cond), x1, 64, method="rk4").x
    assert torch.allclose(x0, want.to(x0.dtype), atol=1e-4)
    assert not torch.allclose(x0, exact.to(x0.dtype), atol=1e-2)  # not the analytic teacher's pairs


def test_quick_reflow2_sweep_records_round1(tmp_path):
    out = tmp_path / "r2.json"
    ME.main(
        [
            "sweep",
            "--quick",
            "--method",
            "reflow2",
            "--presets",
            "ring8",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--only",
            "base@N",
            "MA 0.001 start",
        ]
    )
    res = json.loads(out.read_text())
    assert res["settings"]["round1_steps"] == 24
    assert sorted(res["runs"]) == sorted(
        f"ring8/reflow2/{a}/{s}" for a in ("round1", "base@N", "MA 0.001 start") for s in (0, 1)
    )
    assert res["runs"]["ring8/reflow2/round1/0"]["steps"] == 24
    assert "as a CLI run add teacher.kind=run" in res["runs"]["ring8/reflow2/MA 0.001 start/1"]["cli"]
    from fewstep.benchmarks.ma_report import arm_groups, compare

    lines, recs = compare(arm_groups(res), "ring8", metrics=("mmd2",), nfes=(4,))
    assert "mmd2 =round1" in lines[0] and {r["match"] for r in recs} == {"steps", "round1"}  # no base@cpu arm ran
    r1 = {s: res["runs"][f"ring8/reflow2/round1/{s}"]["eval"]["4"]["mmd2"] for s in (0, 1)}
    ma = {s: res["runs"][f"ring8/reflow2/MA 0.001 start/{s}"]["eval"]["4"]["mmd2"] for s in (0, 1)}
    got = next(r for r in recs if r["match"] == "round1")
    assert abs(got["diff"] - sum(ma[s] - r1[s] for s in (0, 1)) / 2) < 1e-12
