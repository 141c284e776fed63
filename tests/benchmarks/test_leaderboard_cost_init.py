"""The Cost table counts the init of a method with ``Method.needs_init``: its steps and its evaluations per training
sample and step (net rows / (init steps × batch)), beside the method's own columns; other methods show none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.init import init_cost
from fewstep.benchmarks.leaderboard.report import markdown
from fewstep.benchmarks.leaderboard.store import bars_dir, cell_path, write_json
from fewstep.benchmarks.leaderboard.summary import collect

INIT = {"method": "flow_matching", "steps": 10, "train_s": 3.0, "net_evals": 640, "teacher_evals": 0, "cached": True}


def _cell(method: str, target: str, init: dict[str, Any] | None = None) -> dict[str, Any]:
    rec = {
        "method": method,
        "target": target,
        "seed": 0,
        "status": "ok",
        "sampler": "gamma=0 (deterministic jumps), uniform grid",
        "config": "c",
        "budget": {"steps": 10, "batch_size": 32},
        "final": {k: {"mmd2": 0.1, "sample_s": 0.1} for k in ("1", "2", "4")},
        "step_s": 1.0,
        "train_s": 1.0,
        "prepare_s": 0.0,
        "net_evals_per_sample": 12.0,
        "teacher_evals_per_sample": 1.0,
        "prepare_teacher_evals": 0,
        "throughput": {"1": 1.0, "2": 1.0, "4": 1.0},
        "time_to_bar_s": {"1": None, "2": None, "4": None},
        "design_limits": {},
        "resolved": {"method": {"cfg": {}}},
        "host": "h",
        "eval_version": 2,
    }
    return rec if init is None else {**rec, "init": init}


def _cost_row(page: str, method: str) -> list[str]:
    table = page.split("## Cost", 1)[1].split("\n\n## ", 1)[0]
    head = next(line for line in table.splitlines() if line.startswith("| method |"))
    row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    return [dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))[k] for k in cols if k.startswith("init")]


def test_init_cost_is_per_training_sample_and_step() -> None:
    cells = [_cell("dmd2", "random:0", INIT), _cell("dmd2", "random:1", {**INIT, "net_evals": 960, "train_s": 5.0})]
    got = init_cost(cells)
    assert got is not None
    assert (got["method"], got["cells"], got["steps"], got["train_s"]) == ("flow_matching", 2, 10, 4.0)
    assert got["net_evals_per_sample"] == (640 / 320 + 960 / 320) / 2 and got["teacher_evals_per_sample"] == 0
    assert init_cost([_cell("cd", "random:0")]) is None


def test_cost_table_shows_the_init(tmp_path: Path) -> None:
    euler = {str(k): {"mmd2": 1.0} for k in (1, 2, 4, 8, 16, 32, 64)}
    write_json(bars_dir(tmp_path) / "random-0__s0.json", {"dim": 3, "components": 4, "euler": euler})
    write_json(cell_path(tmp_path, "dmd2", "random:0", 0), _cell("dmd2", "random:0", INIT))
    write_json(cell_path(tmp_path, "flow_matching", "random:0", 0), _cell("flow_matching", "random:0"))
    d = collect(tmp_path, [("dmd2", "random:0", 0), ("flow_matching", "random:0", 0)])
    assert d["methods_summary"]["dmd2"]["init"]["net_evals_per_sample"] == 2.0
    assert d["methods_summary"]["flow_matching"]["init"] is None
    page = markdown(d)
    assert _cost_row(page, "dmd2") == ["+ 10 flow_matching steps, 2.0 / 0.0"]
    assert _cost_row(page, "flow_matching") == ["–"]
