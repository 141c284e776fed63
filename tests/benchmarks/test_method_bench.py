"""The generic method benchmark: a tiny smoke run, override parsing, YAML precedence, merging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fewstep.benchmarks import method_bench as mb
from fewstep.benchmarks import method_bench_recipe as recipe
from fewstep.core.flowmap import FlowMap
from fewstep.evaluation.evaluate import evaluate_velocity_solver
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def test_tiny_smoke_run_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    res = mb.main(["--methods", "cd", "--presets", "aniso3", "--seeds", "0", "--steps", "3", "--batch-size", "16",
                   "--n", "200", "--hidden", "16", "--depth", "1", "--out", str(out), "--set", "method.n_steps=4",
                   "--mid-times", "0.25"])
    text = out.read_text()
    assert "| cd | aniso3 | 0.25 |" in text
    assert "| cd | aniso3 |" in text and "--steps 3" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    (run,) = doc["runs"]
    assert run["config"]["n_steps"] == 4 and run["train"]["steps"] == 3
    assert set(run["mmd2"]) == {"1", "2", "4"} and all(math.isfinite(v) for v in run["mmd2"].values())
    assert run["multistep_sampler"].startswith("gamma=1")
    # the bars are the evaluation module's Euler numbers for the same seed (reproducible)
    ref = evaluate_velocity_solver(load_preset("aniso3"), load_preset("aniso3"), "euler", 4, n=200, seed=0)["mmd2"]
    assert abs(doc["bars"]["aniso3"]["4"][0] - ref) < 1e-12
    assert res["fm_step_s"]["aniso3"] > 0 and run["step_s"] > 0
    # merging a result with itself doubles the runs and keeps one row per table
    merged = mb.main(["--merge", str(out.with_suffix(".json")), str(out.with_suffix(".json")),
                      "--out", str(tmp_path / "m.md")])
    mtext = (tmp_path / "m.md").read_text()  # one main row and one t_mid row
    assert len(merged["runs"]) == 2 and mtext.count("| cd | aniso3 |") == 2
    assert mtext.count("| cd | aniso3 | 0.25 |") == 1


@pytest.mark.parametrize("kind", ["flowmap", "gamma1"])
def test_mid_time_one_half_is_the_uniform_two_step_sample(kind: str) -> None:
    """evaluate_mid(t_mid=0.5) draws the same 2-NFE sample as evaluate(nfe=2): same noise, grid and sampler."""
    teacher = load_preset("aniso3")
    torch.manual_seed(0)
    param = "consistency" if kind == "gamma1" else "average_velocity"
    student = FlowMap(MLP(2, hidden=16, depth=1, use_s=param == "average_velocity"), param).eval()
    a = mb.evaluate(student, teacher, 2, 300, 3, kind)["mmd2"]
    b = mb.evaluate_mid(student, teacher, 0.5, 300, 3, kind)["mmd2"]
    assert abs(a - b) < 1e-9
    with pytest.raises(ValueError, match="intermediate time"):
        mb.evaluate_mid(student, teacher, 1.0, 300, 3, kind)


def test_overrides_and_yaml_precedence(tmp_path: Path) -> None:
    over = recipe.parse_overrides(["method.n_steps=7", "train.lr=3e-4", "method.solver=euler"])
    assert over == {"method": {"n_steps": 7, "solver": "euler"}, "train": {"lr": 3e-4}, "student": {}}
    for bad in ("n_steps=7", "model.n_steps=7", "method.n_steps"):
        with pytest.raises(ValueError, match="override|section"):
            recipe.parse_overrides([bad])
    (tmp_path / "cd.yaml").write_text("method:\n  name: cd\n  cfg: {n_steps: 9, target_ema: 0.5}\n"
                                      "train: {lr: 2.0e-4}\n")
    cfg, train = recipe.method_config("cd", {"n_steps": 11}, config_dir=tmp_path)
    assert (cfg.n_steps, cfg.target_ema, train["lr"]) == (11, 0.5, 2e-4)  # CLI > YAML > defaults
    with pytest.raises(ValueError, match="unknown config key"):
        recipe.method_config("cd", {"n_stepz": 1}, config_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown method"):
        mb.main(["--methods", "nope", "--out", str(tmp_path / "x.md")])


def test_student_options_reach_the_network(tmp_path: Path) -> None:
    """``student.*`` overrides (YAML student section < --set) set the MLP embedding; unknown keys are named."""
    (tmp_path / "meanflow.yaml").write_text("student: {max_freq: 4.0, hidden: 999}\n")
    opts = recipe.student_options("meanflow", {"raw_time": True}, config_dir=tmp_path)
    assert opts == {"max_freq": 4.0, "raw_time": True}
    with pytest.raises(ValueError, match="width"):
        recipe.student_options("meanflow", {"width": 3}, config_dir=tmp_path)
    from fewstep.teachers.presets import load_preset

    cfg = recipe.method_config("meanflow", {})[0]
    method = recipe.build_method("meanflow", load_preset("ring8"), cfg, 16, 2, **opts)
    assert float(method.student.net.t_emb.freqs.max()) == pytest.approx(4.0)
    assert method.student.net.net[0].in_features == 2 + 2 * 64 + 2
