"""The `fewstep` CLI: methods, distill (+ resume), sample, eval, diagnose hook and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewstep.cli import DIAGNOSTICS, build_parser, main

torch.set_num_threads(1)
SMALL = ["device=cpu", "student.hidden=16", "student.depth=2", "student.emb_dim=8", "train.batch_size=64",
         "train.log_every=2", "train.tensorboard=false", "train.progress=false", "eval.n_samples=200",
         "eval.nfe=[]"]  # no end-of-training evaluation, except where a test asks for it


def test_methods_lists_registered_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.methods import list_methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    methods = list_methods()
    assert len(out) == len(methods)
    line = next(line for line in out if line.startswith("flow_matching "))
    assert methods["flow_matching"] in line


def test_distill_resume_sample_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    rc = main(["distill", "--method", "flow_matching", "--run-dir", str(run), "data.name=ring8",
               "train.steps=6", "train.ckpt_every=3", "method.cfg.cond_drop=0.0", *SMALL, "eval.nfe=[1]"])
    assert rc == 0
    record = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])  # EvalCallback vs exact ring8
    assert record["step"] == 6 and record["results"]["1"]["mmd2"] > 0 and (run / "samples-6.png").is_file()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == {"name": "flow_matching", "cfg": {"cond_drop": 0.0}} and cfg["train"]["steps"] == 6
    assert (run / "ckpt-6" / "COMPLETE").is_file() and (run / "ckpt-3" / "COMPLETE").is_file()
    assert "done: 6 steps" in capsys.readouterr().out
    # resume with more steps: continues from ckpt-6 and appends rows 8, 10
    assert main(["distill", "--run-dir", str(run), "--resume", "train.steps=10"]) == 0
    with open(run / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("student/loss")]
    assert steps == [2, 4, 6, 8, 10]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 10
    # sample: .npy of the right shape (+ png for 2-D)
    assert main(["sample", str(run), "--nfe", "2", "--n", "50", "--out", str(tmp_path / "s")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (50, 2) and np.isfinite(x).all()
    assert (tmp_path / "s.png").is_file()
    assert main(["sample", str(run), "--grid", "1,0.5,0", "--n", "10", "--out", str(tmp_path / "g")]) == 0
    assert np.load(tmp_path / "g.npy").shape == (10, 2)
    # eval: metrics table + JSON against the analytic ring8 mixture
    assert main(["eval", str(run), "--nfe", "1", "--n", "100", "--out", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["student"]) == {"1"} and res["student"]["1"]["mmd2"] > 0 and "mean_loglik" in res["student"]["1"]
    assert res["checkpoint_step"] == 10 and set(res["teacher_euler"]) == {"1"} and res["teacher_adaptive"]["nfe"] > 8
    assert res["better"]["mmd2"] == "lower" and "mmd2_sd" in res["floor_exact_vs_exact"]
    assert json.loads((tmp_path / "s.json").read_text())["checkpoint_step"] == 10
    out = capsys.readouterr().out
    assert "loaded ckpt-10" in out and "teacher Euler 1" in out and "exact vs exact (floor)" in out


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--method", "nope", "train.steps=1"], "unknown method 'nope'"),
    (["distill", "--method", "flow_matching", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["distill", "--method", "flow_matching", "method.cfg.norm_pp=1", "device=cpu"],
     "unknown config key 'method.cfg.norm_pp'"),
    (["sample", "/nonexistent/run"], "is not a fewstep run folder"),
    (["eval", "/nonexistent/run"], "is not a fewstep run folder"),
    (["distill", "--method", "flow_matching", "--config", "/nonexistent.yaml"], "does not exist"),
])
def test_clear_errors(argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep: error:") and needle in err


def test_resume_without_runs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--method", "flow_matching", "--resume"]) == 2
    assert "no run folder runs/flow_matching-* found" in capsys.readouterr().err


def test_diagnose_hook() -> None:
    assert DIAGNOSTICS == {"tv": "main_tv"}
    assert main(["diagnose", "xyz"]) == 2
    args = build_parser().parse_args(["diagnose", "tv", "--run", "r", "--n", "5"])
    assert args.name == "tv" and args.args == ["--run", "r", "--n", "5"]


def test_diagnose_tv_reaches_fewstep_diagnose(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fewstep.evaluation.diagnose")
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "tv", "--help"])
    assert exc.value.code == 0
    assert "tv" in capsys.readouterr().out


def test_train_teacher_then_distill_config_uses_it(tmp_path: Path) -> None:
    from fewstep.config.build import build_method, load_run_student
    from fewstep.config.schema import load_config

    run = tmp_path / "teacher"
    assert main(["train-teacher", "--data", "ring8", "--run-dir", str(run), "train.steps=4", *SMALL]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == "flow_matching"
    cfg = load_config(None, ["method.name=meanflow", "teacher.kind=run", f"teacher.path={run}", "data.name=ring8",
                             "device=cpu", "student.hidden=8", "student.depth=1"])
    method, _, teacher = build_method(cfg)
    assert method.teacher is teacher
    ref = load_run_student(run, ema=True)
    x, t = torch.randn(5, 2), torch.full((5,), 0.3)
    assert torch.allclose(teacher.velocity(x, t), ref.velocity(x, t), atol=1e-6)
    with pytest.raises(ValueError, match="teacher.kind='run' needs teacher.path"):
        build_method(load_config(None, ["method.name=meanflow", "teacher.kind=run", "device=cpu"]))
