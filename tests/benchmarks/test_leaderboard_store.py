"""The tracked cell store of ``fewstep bench``: records are reused, records of an older evaluation are not (only
their still-valid entries are shown), earlier leaderboard JSON rows import with the stale entries dropped, and
``--report-only`` rebuilds the page from the store alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.benchmarks.leaderboard.cells import Budget
from fewstep.benchmarks.leaderboard.runner import run_grid
from fewstep.benchmarks.leaderboard.store import (
    cell_path,
    import_leaderboard_json,
    is_complete,
    read_json,
    stale_nfe,
    write_json,
)
from fewstep.benchmarks.leaderboard.summary import collect
from fewstep.cli import main

CONSISTENCY = "gamma=1 (jump to data, fresh noise), uniform grid"
DETERMINISTIC = "gamma=0 (deterministic jumps), uniform grid"
B = Budget(steps=10, batch_size=8, hidden=8, depth=1, n=100, probes=1)
EULER = {str(k): {"mmd2": 0.1 / k} for k in (1, 2, 4, 8, 16, 32, 64)}


def _rec(method: str, target: str, sampler: str, version: int | None, final: dict[str, float]) -> dict:
    rec = {
        "method": method,
        "target": target,
        "seed": 0,
        "status": "ok",
        "sampler": sampler,
        "config": "defaults",
        "budget": B.to_dict(),
        "final": {k: {"mmd2": v} for k, v in final.items()},
        "step_s": 0.01,
        "host": "h",
    }
    if version is not None:
        rec["eval_version"] = version
    return rec


ALL = {"1": 0.01, "2": 0.02, "4": 0.03}


def test_stale_entries_are_the_multistep_ones_of_gamma_samplers_before_the_fix() -> None:
    assert sorted(stale_nfe(_rec("cd", "r", CONSISTENCY, None, ALL))) == ["2", "4"]  # no version = 1
    assert sorted(stale_nfe(_rec("cd", "r", CONSISTENCY, 1, ALL))) == ["2", "4"]
    assert stale_nfe(_rec("cd", "r", CONSISTENCY, 2, ALL)) == {}
    assert stale_nfe(_rec("meanflow", "r", DETERMINISTIC, 1, ALL)) == {}  # gamma=0 never re-noises
    assert not is_complete(_rec("cd", "r", CONSISTENCY, 1, ALL))
    assert is_complete(_rec("meanflow", "r", DETERMINISTIC, 1, ALL))
    assert not is_complete(_rec("meanflow", "r", DETERMINISTIC, 2, {"1": 0.1, "2": 0.1}))  # an NFE missing
    assert not is_complete({**_rec("meanflow", "r", DETERMINISTIC, 2, ALL), "status": "failed"})
    # a DM cell made from random weights is stale once the method needs a flow-matching init
    assert sorted(stale_nfe(_rec("dmd2", "r", DETERMINISTIC, 2, ALL))) == ["1", "2", "4"]
    assert stale_nfe({**_rec("dmd2", "r", DETERMINISTIC, 2, ALL), "init": {"method": "flow_matching"}}) == {}


def _fake_cell(calls: list) -> object:
    def cell(method: str, target: str, seed: int, budget: Budget, bars: dict, config_dir: Path) -> dict:
        calls.append((method, target))
        sampler = CONSISTENCY if method == "cd" else DETERMINISTIC
        return _rec(method, target, sampler, None, {"1": 0.5, "2": 0.5, "4": 0.5})

    return cell


def test_runner_reuses_complete_records_and_reruns_stale_ones(tmp_path: Path) -> None:
    root = tmp_path / B.tag()
    write_json(cell_path(root, "meanflow", "random:3", 0), _rec("meanflow", "random:3", DETERMINISTIC, 1, ALL))
    write_json(cell_path(root, "cd", "random:3", 0), _rec("cd", "random:3", CONSISTENCY, 1, ALL))
    calls: list = []
    counts = run_grid(["cd", "meanflow"], ["random:3"], [0], B, tmp_path, "cmd", quiet=True, cell_fn=_fake_cell(calls))
    assert calls == [("cd", "random:3")] and counts == {"ran": 1, "cached": 1, "failed": 0}
    new = read_json(cell_path(root, "cd", "random:3", 0))
    assert new["eval_version"] == 2 and new["command"] == "cmd" and is_complete(new)
    assert read_json(cell_path(root, "meanflow", "random:3", 0))["final"]["2"]["mmd2"] == 0.02  # untouched
    calls.clear()
    run_grid(["cd", "meanflow"], ["random:3"], [0], B, tmp_path, "cmd", quiet=True, cell_fn=_fake_cell(calls))
    assert calls == []


def test_summary_drops_stale_entries_and_lists_them(tmp_path: Path) -> None:
    write_json(tmp_path / "_bars" / "random-3__s0.json", {"dim": 3, "components": 3, "euler": EULER})
    write_json(cell_path(tmp_path, "cd", "random:3", 0), _rec("cd", "random:3", CONSISTENCY, 1, ALL))
    d = collect(tmp_path, [("cd", "random:3", 0)])
    (row,) = d["rows"]
    assert sorted(row["nfe"]) == ["1"]  # the 2/4-NFE entries of version 1 are not metrics of the current sampler
    assert d["stale"] == [{"method": "cd", "target": "random:3", "seed": 0, "nfe": ["2", "4"]}]
    rp = d["methods_summary"]["cd"]["random_pass"]
    assert (rp["1"]["of"], rp["2"]["of"]) == (1, 0)


def _old_leaderboard(path: Path) -> None:
    rows = []
    for method, sampler in (("cd", CONSISTENCY), ("meanflow", DETERMINISTIC)):
        nfe = {k: {"mmd2": v, "mmd2_std": 0.0, "pass": {"4": True}} for k, v in ALL.items()}
        rows.append({"method": method, "target": "random:3", "seeds": [0], "nfe": nfe, "sampler": sampler,
                     "design_limits": {}, "step_s": 0.02})
    rows.append({**rows[1], "target": "random:4", "seeds": [0, 1]})  # a mean over seeds is not a cell
    summary = {m: {"config": "defaults"} for m in ("cd", "meanflow")}
    write_json(path, {"budget": B.to_dict(), "commands": ["fewstep bench old"], "rows": rows,
                      "methods_summary": summary})


def test_import_keeps_valid_entries_only_and_never_overwrites(tmp_path: Path) -> None:
    old, store = tmp_path / "old.json", tmp_path / "cells"
    _old_leaderboard(old)
    counts = import_leaderboard_json(old, store, "old.json at commit abc")
    assert counts == {"imported": 2, "kept": 0, "skipped": 1, "partial": 1}
    root = store / B.tag()
    cd = read_json(cell_path(root, "cd", "random:3", 0))
    assert sorted(cd["final"]) == ["1"] and sorted(cd["stale"]) == ["2", "4"] and not is_complete(cd)
    assert cd["imported_from"] == "old.json at commit abc" and cd["command"] == "fewstep bench old"
    mf = read_json(cell_path(root, "meanflow", "random:3", 0))
    assert sorted(mf["final"]) == ["1", "2", "4"] and is_complete(mf) and mf["final"]["4"] == {"mmd2": 0.03}
    assert import_leaderboard_json(old, store, "again")["kept"] == 2
    assert read_json(cell_path(root, "cd", "random:3", 0))["imported_from"] == "old.json at commit abc"


def test_report_only_rebuilds_the_page_from_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, store, out = tmp_path / "old.json", tmp_path / "cells", tmp_path / "lb.md"
    _old_leaderboard(old)
    root = store / B.tag()
    write_json(root / "_bars" / "random-3__s0.json", {"dim": 3, "components": 3, "euler": EULER})
    argv = ["bench", "--methods", "cd", "meanflow", "--targets", "random:3", "random:4", "--seeds", "0",
            "--steps", "10", "--batch-size", "8", "--hidden", "8", "--depth", "1", "--n", "100", "--probes", "1",
            "--cells-dir", str(store), "--out", str(out), "--no-figure", "--report-only", "--import-json", str(old)]
    assert main(argv) == 0
    assert "2 imported" in capsys.readouterr().out
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["imported"] == 2 and sorted(r["method"] for r in d["rows"]) == ["cd", "meanflow"]
    assert d["missing"] == [["cd", "random:4", 0], ["meanflow", "random:4", 0]]
    text = out.read_text()
    assert "| cd | 1 | 0.0100 ✓ | pending | pending |" in text  # one seed: no "± 0.0000"
    assert "cd/random:3/s0: NFE 2, 4" in text and "fewstep bench old" in text and "--report-only" in text
    assert "Equal budget here means" in text


def test_each_entry_is_compared_with_the_bars_of_its_own_seeds(tmp_path: Path) -> None:
    # seed 0's Euler-4 bar is 0.05, seed 1's 0.01; a method with only seed 0 at 0.03 passes its bar (0.05), though it
    # would miss the mean bar over both seeds (0.03)
    for seed, bar in ((0, 0.05), (1, 0.01)):
        euler = {**EULER, "4": {"mmd2": bar}}
        write_json(tmp_path / "_bars" / f"random-3__s{seed}.json", {"dim": 3, "components": 3, "euler": euler})
    write_json(cell_path(tmp_path, "meanflow", "random:3", 0), _rec("meanflow", "random:3", DETERMINISTIC, 2, ALL))
    write_json(cell_path(tmp_path, "cd", "random:3", 1), {**_rec("cd", "random:3", DETERMINISTIC, 2, ALL), "seed": 1})
    d = collect(tmp_path, [(m, "random:3", s) for m in ("meanflow", "cd") for s in (0, 1)])
    rows = {r["method"]: r for r in d["rows"]}
    assert rows["meanflow"]["nfe"]["1"]["pass"]["4"] is True  # 0.01 at 1 NFE vs bar 0.05 (seed 0)
    assert d["methods_summary"]["meanflow"]["random_pass"]["1"]["passed"] == 1
    big = {**ALL, "1": 0.03}
    write_json(cell_path(tmp_path, "meanflow", "random:3", 0), _rec("meanflow", "random:3", DETERMINISTIC, 2, big))
    write_json(cell_path(tmp_path, "cd", "random:3", 1), {**_rec("cd", "random:3", DETERMINISTIC, 2, big), "seed": 1})
    rows = {r["method"]: r for r in collect(tmp_path, [("meanflow", "random:3", 0), ("cd", "random:3", 1)])["rows"]}
    assert rows["meanflow"]["nfe"]["1"]["pass"]["4"] is True and rows["cd"]["nfe"]["1"]["pass"]["4"] is False
