"""Smoke test of the MA sweep runner (tiny budget), its CLI equivalence, statistics and the fold detector."""

from __future__ import annotations

import json
import math

import torch

from fewstep.benchmarks import ma_experiments as ME
from fewstep.benchmarks.ma_eval import sample_with_density
from fewstep.benchmarks.ma_stats import claim_i_pairs, paired, t_interval


def test_quick_sweep_and_report(tmp_path, capsys):
    out, md = tmp_path / "ma.json", tmp_path / "ma.md"
    ME.main(["sweep", "--quick", "--presets", "ring8", "--out", str(out), "--cache", str(tmp_path / "cache")])
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 2 * 5  # 2 seeds x (3 baselines + 1 lambda x 2 schedules)
    run = res["runs"]["ring8/reflow/base@cpu/1"]
    assert run["steps"] == 24 and run["lam"] == 0.0  # r = 2 in --quick: equal-CPU baseline = 2 N
    ma = res["runs"]["ring8/reflow/MA 0.001 mid/0"]
    assert ma["warmup"] == 6 and "method.cfg.ma_weight=0.001" in ma["cli"] and "method.cfg.ma_warmup=6" in ma["cli"]
    for r in res["runs"].values():
        for k in ("1", "2", "4"):
            e = r["eval"][k]
            assert math.isfinite(e["mmd2"]) and 0.0 <= e["fold"] <= 1.0 and e["eq_ratio"] > 0
        assert r["tv_bound"]["sum_eps"] >= 0 and len(r["tv_bound"]["eps"]) == 4
    capsys.readouterr()  # drop the sweep's progress lines
    ME.main(["modes", str(out), "--nfe", "2"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 5 and table[2].startswith("| ring8/reflow/base@N | 2 | ")
    ME.main(["report", str(out), "--out", str(md)])
    text = md.read_text()
    assert "## ring8" in text and "MA 0.001 start" in text and "Telescoping bound" in text
    assert "### Claim (i)" in text and "cached students have held-out FM losses" in text


def test_cli_line_builds_the_trained_config(tmp_path):
    budget = ME.Budget(steps=40)
    arm = next(a for a in ME.arms(budget, ratio=3.0, lambdas=(1e-2,)) if a.name == "MA 0.01 mid")
    ov = ME.arm_overrides("aniso3", arm, 3, budget, ME.MA_DEFAULT)
    line = ME.cli_line("reflow", ov, "runs/x")
    assert line.startswith("fewstep distill --config configs/reflow_ma.yaml seed=3 ")
    cfg = ME.arm_config("reflow", line.split(" --run-dir")[0].split()[4:], tmp_path)
    assert cfg.seed == 3 and cfg.teacher.name == "aniso3" and cfg.train.steps == 40
    assert cfg.method.cfg["ma_weight"] == 0.01 and cfg.method.cfg["ma_warmup"] == 20
    assert cfg.method.cfg["ma_mode"] == ME.MA_DEFAULT["ma_mode"]
    names = [a.name for a in ME.arms(budget, 3.0, (1e-2,))]
    assert names == ["base@N", "MA 0.01 start", "base@cpu", "MA 0.01 mid", "base@cpu-mid"]
    assert [a.steps for a in ME.arms(budget, 3.0, (1e-2,))] == [40, 40, 120, 40, 80]


def test_fold_detector_flags_a_folding_map():
    x1 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def reflect(x, t, s, cond=None):  # det = -1 everywhere: a fold in the orientation sense
        return x * torch.tensor([-1.0, 1.0], dtype=x.dtype)

    def scale(x, t, s, cond=None):
        return 2.0 * x

    _, lq, folded = sample_with_density(reflect, x1, 1)
    assert bool(folded.all())
    _, lq2, folded2 = sample_with_density(scale, x1, 2)
    assert not bool(folded2.any())
    assert torch.allclose(lq2, lq - 2 * 2 * math.log(2.0))  # two jumps, each log|det| = 2 log 2


def test_paired_statistics_and_claim_i_pairs():
    m, hw, n = t_interval([1.0, 2.0, 3.0])
    assert n == 3 and m == 2.0 and abs(hw - 4.303 * 1.0 / math.sqrt(3)) < 1e-3
    base = {s: 1.0 + 0.01 * s for s in range(5)}
    assert paired({s: v - 0.5 for s, v in base.items()}, base)["verdict"] == "better"
    assert paired({s: v + 0.5 for s, v in base.items()}, base)["verdict"] == "worse"
    noisy = {s: base[s] + (0.1 if s % 2 else -0.1) for s in base}
    assert paired(noisy, base)["verdict"] == "tie"
    g = torch.Generator().manual_seed(0)
    common = torch.rand(400, generator=g)
    e = torch.randn(400, generator=g)
    losses = {"a": common, "b": common + 1e-4 * (e - e.mean()), "c": common + 1.0}
    pairs = claim_i_pairs(losses, {"a": 0.01, "b": 0.05, "c": 0.9})
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b")]  # c's loss differs: never matched


def _fake_run(sum_eps: float, tv_final: float, mmd: float) -> dict:
    ev = {str(k): {"mmd2": mmd, "kl_knn": 1.0, "tv_knn": 0.5, "loglik": -1.0} for k in (1, 2, 4)}
    bound = {"sum_eps": sum_eps, "tv_final": tv_final}
    return {"eval": ev, "tv_bound": bound, "steps": 10, "cpu_s_per_step": 1e-3, "fm_loss": 0.1}


def test_tv_bound_comparison_reads_the_bound_fields():
    from fewstep.benchmarks.ma_report import arm_groups, compare, render

    runs = {}
    for s in range(5):
        runs[f"ring8/reflow/base@N/{s}"] = _fake_run(0.8 + 0.01 * s, 0.4 + 0.01 * s, 0.1)
        runs[f"ring8/reflow/base@cpu/{s}"] = _fake_run(0.9 + 0.01 * s, 0.6 + 0.01 * s, 0.1)
        runs[f"ring8/reflow/MA 0.01 start/{s}"] = _fake_run(0.6 + 0.01 * s, 0.5 + 0.01 * s, 0.1)
    res = {"runs": runs, "settings": {}, "ratio": {}}
    lines, recs = compare(arm_groups(res), "ring8", metrics=("sum_eps", "tv_final"), nfes=(4,))
    got = {(r["metric"], r["match"]): r for r in recs}
    assert set(got) == {(m, k) for m in ("sum_eps", "tv_final") for k in ("steps", "CPU")}
    assert abs(got["sum_eps", "steps"]["diff"] + 0.2) < 1e-9 and got["sum_eps", "steps"]["verdict"] == "better"
    assert abs(got["tv_final", "steps"]["diff"] - 0.1) < 1e-9 and got["tv_final", "steps"]["verdict"] == "worse"
    assert abs(got["tv_final", "CPU"]["diff"] + 0.1) < 1e-9 and got["tv_final", "CPU"]["verdict"] == "better"
    assert "better" in lines[2] and "–" not in lines[2]
    text, summary = render(res, with_claim_i=False)
    tail = text.split("Does MA lower")[1]
    assert "| MA 0.01 start | 4 | -" in tail and len(summary["tv"]["compare"]) == 4
    assert summary["tv"]["ring8"]["n"] == 15 and "| ring8 | 15 | " in text
    runs["ring8/reflow/MA 0.01 start/0"]["tv_bound"]["tv_final"] = float("nan")  # a folding map: no TV
    text, summary = render(res, with_claim_i=False)
    assert summary["tv"]["ring8"]["n"] == 14 and "| ring8 | 14 (+1 folded: no TV) | " in text
    assert math.isfinite(summary["tv"]["ring8"]["rho"]["rho"])


class _Scale(torch.nn.Module):
    """The flow map x1 -> c * x1 for every (t, s): exact for N(0, c^2 I) at any number of jumps."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, t, s, cond=None):
        return x * self.c ** (torch.as_tensor(t - s, dtype=x.dtype).reshape(-1, 1))


def test_density_free_metrics_above_3d_only_when_asked():
    from fewstep.benchmarks.ma_eval import evaluate_student
    from fewstep.teachers.gmm import GaussianMixtureTeacher

    d, sd = 5, 0.5
    teacher = GaussianMixtureTeacher([1.0], torch.zeros(1, d), (sd**2 * torch.eye(d))[None])
    assert "kl_knn" not in evaluate_student(_Scale(sd), teacher, n=1500, nfe=(1,))[1]  # default: d <= 3 only
    exact = evaluate_student(_Scale(sd), teacher, n=1500, nfe=(1, 2), knn_max_dim=8)
    wide = evaluate_student(_Scale(2 * sd), teacher, n=1500, nfe=(1,), knn_max_dim=8)[1]
    for m in (exact[1], exact[2]):  # the exact sampler scores its floor (same estimator on exact samples)
        assert abs(m["kl_knn"] - m["kl_knn_floor"]) < 0.15 and abs(m["kl_knn"]) < 0.2 and m["fold"] == 0.0
    # KL(N(0, 4 s^2 I) || N(0, s^2 I)) = d/2 (4 - 1 - log 4) = 4.03 nats in 5-D; TV of the two is large
    assert abs(wide["kl_knn"] - d / 2 * (3 - math.log(4))) < 0.3 and wide["tv_knn"] > 0.6
    assert abs(wide["kl_is"] - wide["kl_knn"]) < 0.3  # agrees with the change-of-variables KL (no fold here)
