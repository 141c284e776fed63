"""``train_run_folder``: a bench run (learned teacher, cell init) appears under its cached name only once trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep.benchmarks.leaderboard.cached_run import train_run_folder
from fewstep.benchmarks.leaderboard.cell_setup import Budget, cell_config
from fewstep.config.build import load_run_student
from fewstep.config.run_folder import read_run_config

torch.set_num_threads(1)
TINY = Budget(steps=3, batch_size=16, hidden=8, depth=1, n=100, probes=1)


def _cfg() -> Any:
    return cell_config("flow_matching", "random:0", 0, TINY)


def test_trained_folder_is_complete_and_loadable(tmp_path: Path) -> None:
    out, cfg, seen = tmp_path / "cache" / "run", _cfg(), []

    def hook(trainer: Any) -> Any:
        seen.append(("built", trainer.step, out.exists()))  # before training, nothing under the cached name
        return lambda: seen.append(("done", trainer.step, torch.get_num_threads()))

    threads = torch.get_num_threads()
    train_s = train_run_folder(cfg, out, threads=1, on_trainer=hook)
    assert train_s > 0 and seen == [("built", 0, False), ("done", TINY.steps, 1)]
    assert torch.get_num_threads() == threads
    assert [p.name for p in out.parent.iterdir()] == ["run"]  # no temporary folder left
    saved = read_run_config(out)
    assert (saved.sampler.gamma, saved.sampler.grid) == (0.0, "uniform")  # stored resolved
    assert cfg.sampler.gamma is None  # the caller's config is not modified
    assert set(load_run_student(out).state_dict())


def test_failed_training_leaves_nothing(tmp_path: Path) -> None:
    out, closed = tmp_path / "run", []

    def hook(trainer: Any) -> Any:
        def boom() -> None:
            raise RuntimeError("cut off")

        trainer.fit = boom
        return lambda: closed.append(True)

    with pytest.raises(RuntimeError, match="cut off"):
        train_run_folder(_cfg(), out, on_trainer=hook)
    assert closed == [True] and list(tmp_path.iterdir()) == []


def test_a_folder_finished_meanwhile_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"

    def other_process(trainer: Any) -> None:
        out.mkdir()
        (out / "theirs").write_text("x")

    train_run_folder(_cfg(), out, on_trainer=other_process)
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and [p.name for p in out.iterdir()] == ["theirs"]
