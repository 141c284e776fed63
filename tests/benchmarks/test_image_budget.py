"""image_budget: per-seed FD at two budgets, the seed-paired difference (longer - table) and the wall-time log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.benchmarks.image_budget import budget_rows, main, wall_times


def _write(d: Path, name: str, fd: dict[int, float], steps: int) -> None:
    rows = [{"sampler": f"m {k}", "nfe": k, "steps": steps, "fd": v, "precision": 0.9, "recall": 0.9,
             "class_acc": 0.9} for k, v in fd.items()]
    (d / f"{name}.json").write_text(json.dumps(rows))


def test_paired_difference_sign_interval_and_verdict(tmp_path: Path) -> None:
    base = {0: {1: 30.0, 2: 16.0}, 1: {1: 32.0, 2: 15.0}, 2: {1: 31.0, 2: 17.0}}
    long = {0: {1: 13.0, 2: 16.5}, 1: {1: 14.0, 2: 14.0}, 2: {1: 15.0, 2: 17.5}}
    for s in range(3):
        tag = f"-s{s}" if s else ""
        _write(tmp_path, f"m{tag}", base[s], 300)
        _write(tmp_path, f"m-x4{tag}", long[s], 1200)
    rows = {r["nfe"]: r for r in budget_rows(tmp_path, ["m"], "-x4")}
    one = rows[1]["diff"]
    assert one["diff"] == pytest.approx(-17.0)  # longer minus table budget: negative = better
    assert one["n"] == 3 and one["verdict"] == "better"
    # differences -17, -18, -16: sd 1, 95 % t half-width t_{0.975,2} / sqrt(3) = 2.484
    assert one["hw"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert rows[2]["diff"]["diff"] == pytest.approx(0.0) and rows[2]["diff"]["verdict"] == "tie"
    assert rows[1]["steps"] == ([300], [1200])
    assert rows[1]["long"] == {0: 13.0, 1: 14.0, 2: 15.0}
    _write(tmp_path, "m600", {1: 20.0}, 600)
    other = budget_rows(tmp_path, ["m"], "-x4", base_tag="600")[0]
    assert other["base"] == {0: 20.0} and other["diff"]["diff"] == pytest.approx(-7.0)


def test_missing_seeds_are_left_out_and_cli_writes_table(tmp_path: Path) -> None:
    _write(tmp_path, "m", {1: 30.0}, 300)
    _write(tmp_path, "m-s1", {1: 31.0}, 300)
    _write(tmp_path, "m-x4", {1: 20.0}, 1200)
    (tmp_path / "times.log").write_text("08:38:15 START m-x4\n08:40:45 DONE m-x4 train_s=144 eval_s=6\n"
                                        "08:41:00 TRAINFAIL other\n")
    assert wall_times(tmp_path / "times.log") == [("m-x4", 144, 6)]
    out = tmp_path / "t.md"
    assert main(["--dir", str(tmp_path), "--tag=-x4", "--methods", "m", "--times", str(tmp_path / "times.log"),
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "| m | 1 | 300 -> 1200 | 30.00 / 31.00 | 20.00 | -10.00 (n 1) | - |" in text
    assert "| m-x4 | 144 | 6 |" in text
