"""``fewstep bench`` init: a cell of a method with ``needs_init`` starts from a cached flow-matching run of the same
target, seed and budget, and its record and ``prepare_s`` carry the init's cost; other methods are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fewstep.benchmarks.leaderboard.cells as cells
import fewstep.benchmarks.leaderboard.init as init
from fewstep.benchmarks.leaderboard.cells import Budget, run_cell
from fewstep.benchmarks.leaderboard.summary import budget_notes
from fewstep.benchmarks.leaderboard.targets import teacher_curve
from fewstep.config.build import load_run_student
from fewstep.methods.registry import get_method

torch.set_num_threads(1)
TINY = Budget(steps=10, batch_size=32, hidden=16, depth=1, n=100, probes=1)
TARGET = "random:0"


@pytest.fixture()
def bars(tmp_path: Path) -> dict[str, Any]:
    return teacher_curve(TARGET, 0, TINY.n, tmp_path / "bars")


def test_dm_methods_declare_a_flow_matching_init() -> None:
    assert {m: get_method(m).needs_init for m in ("dmd", "dmd2", "ddmd", "cdm")} == dict.fromkeys(
        ("dmd", "dmd2", "ddmd", "cdm"), "flow_matching"
    )
    assert get_method("flow_matching").needs_init is None and get_method("cd").needs_init is None


def test_dm_cell_starts_from_the_cached_flow_matching_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bars: dict[str, Any]
) -> None:
    monkeypatch.setenv(init.INIT_ENV, str(tmp_path / "inits"))
    built: list[dict[str, torch.Tensor]] = []
    real_build = cells.build_run

    def spy(cfg: Any, **kw: Any) -> Any:  # the student right after build, before any training step
        trainer = real_build(cfg, **kw)
        built.append({k: v.clone() for k, v in trainer.method.student.state_dict().items()})
        return trainer

    monkeypatch.setattr(cells, "build_run", spy)
    rec = run_cell("dmd2", TARGET, 0, TINY, bars)
    assert rec["status"] == "ok", rec.get("error")
    folder = init.init_folder("flow_matching", TARGET, 0, TINY)
    assert (folder / init.MANIFEST).is_file()
    assert rec["overrides"][-1] == f"student.init_from={folder}"
    assert rec["resolved"]["student"]["init_from"] == str(folder)
    fm = load_run_student(folder).state_dict()
    assert built and built[0].keys() == fm.keys()
    assert all(torch.equal(built[0][k], fm[k]) for k in fm)  # the DM student starts from the FM weights
    got = rec["init"]
    assert got["method"] == "flow_matching" and got["steps"] == TINY.steps and not got["cached"]
    assert got["train_s"] > 0 and got["net_evals"] == TINY.steps * TINY.batch_size
    assert rec["prepare_s"] >= got["train_s"]
    assert any("flow_matching init of 10 steps" in n for n in budget_notes(rec))

    def no_training(*a: Any, **k: Any) -> Any:
        raise AssertionError("the cached init was trained again")

    monkeypatch.setattr(init, "train_run_folder", no_training)
    again = run_cell("dmd2", TARGET, 0, TINY, bars)  # second cell: the init is reused, nothing is trained
    assert again["status"] == "ok" and again["init"]["cached"]
    assert again["init"]["train_s"] == got["train_s"] and again["prepare_s"] >= got["train_s"]


def test_method_without_init_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bars: dict) -> None:
    monkeypatch.setenv(init.INIT_ENV, str(tmp_path / "inits"))
    rec = run_cell("flow_matching", TARGET, 0, TINY, bars)
    assert rec["status"] == "ok" and "init" not in rec
    assert rec["overrides"] == cells.cell_overrides("flow_matching", TARGET, 0, TINY)
    assert rec["resolved"]["student"]["init_from"] == ""
    assert not (tmp_path / "inits").exists() and not any("init of" in n for n in budget_notes(rec))
