"""benchmarks.image_tables: grouping of eval JSONs by method and training seed, and the 2-standard-error bars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.benchmarks.image_tables import bar, main

TEACHER = [{"sampler": s, "nfe": k, "fd": fd, "precision": 0.9, "recall": 0.9, "class_acc": 0.98}
           for s, k, fd in [("Euler 1", 1, 600.0), ("Euler 2", 2, 56.0), ("Euler 4", 4, 20.0), ("Euler 8", 8, 13.0),
                            ("dopri5 (rtol 0.0001)", 62, 12.0)]]


def _eval(path: Path, method: str, fds: list[float]) -> Path:
    rows = [{"sampler": f"{method} {k}", "nfe": k, "steps": 300, "fd": fd, "precision": 0.8, "recall": 0.7,
             "class_acc": 0.9} for k, fd in zip((1, 2, 4), fds, strict=True)]
    path.write_text(json.dumps(rows))
    return path


def test_bar_two_standard_errors() -> None:
    assert bar([10.0], 20.0) == "met" and bar([30.0], 20.0) == "miss"
    assert bar([10.0, 11.0, 12.0], 20.0) == "met"  # mean 11, se 0.58
    assert bar([15.0, 25.0, 20.0], 20.0) == "tie"
    assert bar([29.0, 31.0, 30.0], 20.0) == "miss"


def test_table_groups_seeds(tmp_path: Path) -> None:
    t = tmp_path / "t.json"
    t.write_text(json.dumps(TEACHER))
    evals = [_eval(tmp_path / f"a{i}.json", "cd", [15.0 + i, 14.0 + i, 12.0]) for i in range(3)]
    evals.append(_eval(tmp_path / "b.json", "reflow", [30.0, 12.0, 11.0]))
    out = tmp_path / "s.md"
    assert main(["--teacher", str(t), "--evals", *map(str, evals), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| cd | 300 | 3 | 16.00 ± 1.00 | 15.00 ± 1.00 | 12.00 ± 0.00 | 0.800 / 0.700 / 0.900 | met | miss |" in text
    assert "| reflow | 300 | 1 | 30.00 | 12.00 | 11.00 |" in text and text.count("| miss | met |") == 1
    assert "Euler 1 " not in text and "teacher Euler 8 | - | - | 13.00 (NFE 8)" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data["students"]] == ["cd", "reflow"]


def test_reads_fewstep_eval_dicts(tmp_path: Path) -> None:
    """A ``fewstep eval`` JSON (dict keyed by NFE) joins the image_bench rows of the same method."""
    t = tmp_path / "t.json"
    t.write_text(json.dumps(TEACHER))
    a = _eval(tmp_path / "a.json", "scm", [15.0, 12.0, 12.0])
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"run_dir": "runs/images/scm-lf-x2-s1", "checkpoint_step": 400, "student": {
        k: {"fd": fd, "precision": 0.8, "recall": 0.7, "class_acc": 0.9, "nfe": float(k)}
        for k, fd in (("2", 14.0), ("1", 17.0))}}))
    out = tmp_path / "s.md"
    assert main(["--teacher", str(t), "--evals", str(a), str(b), "--out", str(out)]) == 0
    assert "| scm | 300/400 | 2 | 16.00 ± 1.41 | 13.00 ± 1.41 | 12.00 |" in out.read_text()
    b.write_text(json.dumps({"run_dir": "runs/images/perflow-lf", "checkpoint_step": 300, "student": {
        "2": {"fd": 14.0, "precision": 0.8, "recall": 0.7, "class_acc": 0.9, "nfe": 2.0}}}))
    assert main(["--teacher", str(t), "--evals", str(b), "--out", str(out)]) == 0
    assert "| perflow | 300 | 1 | - | 14.00 | - | - | - | miss |" in out.read_text()


def test_configs_mark_bars_not_claimed(tmp_path: Path) -> None:
    """--configs: the one-step DMD2 image config does not claim 2 NFE, the 2-window PeRFlow not 1 NFE (by design,
    one line each under the table); a method without a config keeps its verdicts; a missing config is one line."""
    t = tmp_path / "t.json"
    t.write_text(json.dumps(TEACHER))
    evals = [_eval(tmp_path / "d.json", "dmd2", [12.0, 50.0, 90.0]), _eval(tmp_path / "p.json", "perflow",
                                                                            [150.0, 12.0, 11.0]),
             _eval(tmp_path / "c.json", "cd", [15.0, 14.0, 12.0])]
    out = tmp_path / "s.md"
    assert main(["--teacher", str(t), "--evals", *map(str, evals), "--configs", "configs/images/dmd2.yaml",
                 "configs/images/perflow.yaml", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| dmd2 | 300 | 1 | 12.00 | 50.00 | 90.00 | 0.800 / 0.700 / 0.900 | met | by design |" in text
    assert "| perflow | 300 | 1 | 150.00 | 12.00 | 11.00 | 0.800 / 0.700 / 0.900 | by design | met |" in text
    assert "| cd | 300 | 1 | 15.00 | 14.00 | 12.00 | 0.800 / 0.700 / 0.900 | met | miss |" in text
    assert "- dmd2, 2 NFE: one-step generator" in text and "- perflow, 1 NFE: one jump per window" in text
    with pytest.raises(SystemExit, match="^--configs: "):
        main(["--teacher", str(t), "--evals", str(evals[0]), "--configs", str(tmp_path / "none.yaml"),
              "--out", str(out)])
