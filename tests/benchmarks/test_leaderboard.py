"""``fewstep bench``: a smoke run writes the page, JSON and figure, resumes from its cache, and the cells use the
shipped configs with only the target and the budget changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.benchmarks.leaderboard.cells import Budget, cell_config, design_limits, shipped_design_limits
from fewstep.benchmarks.leaderboard.summary import collect
from fewstep.cli import main
from fewstep.config.schema import load_config

torch.set_num_threads(1)
SMOKE = [
    "--quick",
    "--methods",
    "flow_matching",
    "cd",
    "--targets",
    "aniso3",
    "--steps",
    "4",
    "--n",
    "100",
    "--probes",
    "2",
    "--no-figure",
]


def test_bench_quick_smoke_writes_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, out = tmp_path / "bench", tmp_path / "lb.md"
    argv = ["bench", *SMOKE, "--run-dir", str(run), "--out", str(out)]
    assert main(argv) == 0
    assert "cells: 2 run, 0 cached, 0 failed" in capsys.readouterr().out
    text = out.read_text()
    assert "fewstep bench --methods flow_matching cd --targets aniso3" in text and "### aniso3" in text
    d = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in d["rows"]} == {"flow_matching", "cd"} and not d["missing"]
    cells = sorted(run.glob("*/aniso3/*/seed0.json"))  # <cells dir>/<budget tag>/<target>/<method>/seed<k>.json
    assert len(cells) == 2
    cd = json.loads(next(c for c in cells if c.parent.name == "cd").read_text())
    assert cd["status"] == "ok" and cd["sampler"].startswith("gamma=1") and len(cd["probes"]) == 2
    assert cd["net_evals_per_sample"] > 0 and cd["teacher_evals_per_sample"] > 0
    assert cd["eval_version"] == 2 and cd["command"].startswith("fewstep bench") and cd["host"]
    stamps = {c: c.stat().st_mtime_ns for c in cells}
    assert main(argv) == 0  # second run: everything cached, nothing recomputed
    assert "cells: 0 run, 2 cached, 0 failed" in capsys.readouterr().out
    assert {c: c.stat().st_mtime_ns for c in cells} == stamps
    out.unlink()
    assert main([*argv, "--report-only"]) == 0  # the page again, from the stored cells alone
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == d["rows"]


def test_bad_target_and_method_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, needle in (
        (["--targets", "ring9"], "unknown leaderboard target 'ring9'"),
        (["--targets", "random:x"], "random:<seed>"),
        (["--methods", "nope"], "unknown method"),
    ):
        assert main(["bench", "--quick", "--run-dir", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]


def test_cell_config_keeps_the_shipped_config_and_sets_target_and_budget() -> None:
    b = Budget(steps=300, batch_size=128, hidden=64, depth=2, n=500, probes=3)
    cfg = cell_config("meanflow", "random:3", 1, b)
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "meanflow.yaml")
    assert cfg.method.cfg == shipped.method.cfg and cfg.train.lr == shipped.train.lr
    assert cfg.student.max_freq == shipped.student.max_freq and cfg.student.raw_time
    assert (cfg.teacher.name, cfg.teacher.conditional, cfg.seed) == ("random:3", False, 1)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.student.hidden, cfg.student.depth) == (300, 128, 64, 2)
    assert cfg.train.eval_every == 100
    dmd = cell_config("dmd2", "ring8", 0, b)
    assert dmd.teacher.guidance == 1.0 and dmd.data.name == "teacher"
    # reflow-family pairs follow the cell seed (independent seeds); other keys of the shipped config stay
    reflow = cell_config("reflow", "ring8", 2, b)
    assert reflow.method.cfg["pair_seed"] == 2 and reflow.method.cfg["n_pairs"] == 20000
    assert "pair_seed" not in cfg.method.cfg


def test_design_limits_come_from_the_configs() -> None:
    b = Budget(steps=10, n=100)
    perflow = design_limits(cell_config("perflow", "ring8", 0, b))
    assert list(perflow) == [1] and "num_windows=2" in perflow[1]
    assert sorted(design_limits(cell_config("dmd2", "ring8", 0, b))) == [2, 4]
    assert design_limits(cell_config("meanflow", "ring8", 0, b)) == {}
    # a config that evaluates NFE 1 only (reflow_distill) claims no multi-step sampling, also inside a cell
    assert sorted(design_limits(cell_config("reflow_distill", "random:1", 0, b))) == [2, 4]
    assert sorted(shipped_design_limits("reflow_distill")) == ["2", "4"]


def _cell(method: str, target: str, mmd: dict[str, float], step_s: float, host: str = "h") -> dict:
    return {
        "method": method,
        "target": target,
        "seed": 0,
        "status": "ok",
        "sampler": "gamma=0 (deterministic jumps), uniform grid",
        "config": "c",
        "budget": {"steps": 10},
        "final": {k: {"mmd2": v, "sample_s": 0.1} for k, v in mmd.items()},
        "step_s": step_s,
        "train_s": 1.0,
        "prepare_s": 0.0,
        "net_evals_per_sample": 1.0,
        "teacher_evals_per_sample": 1.0,
        "prepare_teacher_evals": 0,
        "throughput": {"1": 1.0, "2": 1.0, "4": 1.0},
        "time_to_bar_s": {"1": 0.5, "2": None, "4": None},
        "design_limits": {},
        "resolved": {"method": {"cfg": {}}},
        "host": host,
        "eval_version": 2,
    }


def test_summary_pass_counts_and_cost_ratio(tmp_path: Path) -> None:
    from fewstep.benchmarks.leaderboard.store import bars_dir, cell_path, write_json

    euler = {str(k): {"mmd2": v} for k, v in zip((1, 2, 4, 8, 16, 32, 64), (3, 0.3, 0.05, 0.02, 0.01, 0.005, 0.004))}
    for t in ("random:0", "random:1"):
        write_json(bars_dir(tmp_path) / f"{t.replace(':', '-')}__s0.json", {"dim": 3, "components": 4, "euler": euler})
    # random:0 passes 1 NFE (0.04 < E4 0.05) and 2 NFE (0.01 < E8 0.02); random:1 passes neither
    write_json(cell_path(tmp_path, "m", "random:0", 0), _cell("m", "random:0", {"1": 0.04, "2": 0.01, "4": 0.02}, 2.0))
    write_json(cell_path(tmp_path, "m", "random:1", 0), _cell("m", "random:1", {"1": 0.06, "2": 0.03, "4": 0.001}, 3))
    fm = _cell("flow_matching", "random:0", {"1": 1, "2": 1, "4": 1}, 1.0)
    write_json(cell_path(tmp_path, "flow_matching", "random:0", 0), fm)
    write_json(cell_path(tmp_path, "flow_matching", "random:1", 0), {**fm, "target": "random:1", "host": "other"})
    grid = [(m, t, 0) for t in ("random:0", "random:1", "random:2") for m in ("m", "flow_matching")]
    d = collect(tmp_path, grid)
    rp = d["methods_summary"]["m"]["random_pass"]
    assert (rp["1"]["passed"], rp["1"]["of"], rp["2"]["passed"], rp["4"]["passed"]) == (1, 2, 1, 1)
    # random:0 pairs with flow_matching on the same host; random:1's flow_matching ran on another host
    assert d["methods_summary"]["m"]["step_vs_fm"] == 2.0
    assert d["missing"] == [["flow_matching", "random:2", 0], ["m", "random:2", 0]]


def test_targets_expand_and_bars_are_cached(tmp_path: Path) -> None:
    from fewstep.benchmarks.leaderboard.targets import EULER_NFE, expand_targets, teacher_curve

    names = expand_targets(["ring8", "random", "random:3"], random_n=4)
    assert names == ["ring8", "random:0", "random:1", "random:2", "random:3"]
    rec = teacher_curve("random:3", 0, 200, tmp_path)
    assert rec["dim"] == 3 and list(rec["euler"]) == [str(k) for k in EULER_NFE]
    assert rec["euler"]["1"]["mmd2"] > rec["euler"]["64"]["mmd2"]  # Euler improves with steps
    assert teacher_curve("random:3", 0, 200, tmp_path) == rec  # second call reads the cache
    digits = teacher_curve("digits", 0, 100)
    assert digits["dim"] == 64 and "fd" in digits["euler"]["4"]
