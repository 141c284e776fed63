"""``fewstep bench`` on a learned teacher: a tiny teacher is trained through ``fewstep train-teacher``, cached by its
config hash, distilled through the cell code path as ``teacher.kind=run``, and its bars are its own Euler curve
against the held-out real digits (not an analytic mixture's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.benchmarks.leaderboard.learned import real_reference, teacher_dir
from fewstep.benchmarks.leaderboard.store import bars_dir, cell_path
from fewstep.benchmarks.leaderboard.targets import bar_file, sample_metrics
from fewstep.cli import main
from fewstep.config.build import load_run_student
from fewstep.evaluation.evaluate import noise
from fewstep.sampling.samplers import solve, time_grid
from fewstep.teachers.module import ModuleTeacher

torch.set_num_threads(1)
TINY = """seed: 0
device: cpu
data: {name: digits, kwargs: {split: train, conditional: false}}
student: {hidden: 32, depth: 2, emb_dim: 16, parameterization: velocity}
method: {name: flow_matching, cfg: {cond_drop: 0.0}}
train: {steps: STEPS, batch_size: 64, lr: 1.0e-3, ema_decays: [0.9], log_every: 1000, eval_every: 0, ckpt_every: 0,
        progress: false, tensorboard: false}
eval: {nfe: []}
"""


def _config(tmp_path: Path, steps: int = 40, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(TINY.replace("STEPS", str(steps)))
    return p


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEWSTEP_BENCH_TEACHERS", str(tmp_path / "teachers"))
    return tmp_path / "teachers"


def test_learned_target_end_to_end_with_its_own_bars(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"learned:{_config(tmp_path)}"
    cells, out = tmp_path / "cells", tmp_path / "lb.md"
    argv = ["bench", "--methods", "cd", "--targets", target, "--seeds", "0", "--steps", "4", "--batch-size", "32"]
    argv += ["--hidden", "16", "--depth", "1", "--n", "100", "--probes", "1", "--cells-dir", str(cells)]
    argv += ["--out", str(out), "--no-figure"]
    assert main(argv) == 0
    assert "cells: 1 run, 0 cached, 0 failed" in capsys.readouterr().out
    run = teacher_dir(target)
    assert run.parent == cache and (run / "config.yaml").is_file()  # trained by train-teacher, cached by hash
    root = next(cells.iterdir())
    rec = json.loads(cell_path(root, "cd", target, 0).read_text())
    assert rec["status"] == "ok" and "teacher.kind=run" in rec["overrides"]
    assert f"teacher.path={run}" in rec["overrides"] and "data.name=digits" in rec["overrides"]
    assert rec["teacher_evals_per_sample"] > 0  # cd queried the learned teacher
    # the bars are the learned teacher's own Euler sampler on the evaluation noise vs the held-out real digits
    bars = json.loads(bar_file(bars_dir(root), target, 0).read_text())
    teacher = ModuleTeacher.from_flowmap(load_run_student(run))
    x1, ref = noise(100, teacher, 0).float(), real_reference(target)
    assert len(ref) == 359 and bars["reference"].startswith("359 held-out")
    for k in (1, 4, 16):
        with torch.no_grad():
            x = solve(teacher, x1, time_grid(k), method="euler").x
        want = sample_metrics(x, ref)
        assert bars["euler"][str(k)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    floor = bars["floor"]
    assert floor["real_train"]["mmd2"] < floor["teacher_ode"]["mmd2"]  # 40 steps: far from the real digits
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["targets"][target]["floor"]["teacher_ode"]["nfe"] > 0 and "(learned teacher, d = 64" in out.read_text()
    ent, bar = d["rows"][0]["nfe"]["1"], bars["euler"]["4"]
    assert ent["pass_fd"]["4"] == (ent["fd"] < bar["fd"]) and ent["pass"]["4"] == (ent["mmd2"] < bar["mmd2"])
    stamp = run.stat().st_mtime_ns
    assert main([*argv, "--report-only"]) == 0 and run.stat().st_mtime_ns == stamp  # no retraining


def test_teacher_cache_is_keyed_by_the_config(tmp_path: Path, cache: Path) -> None:
    a, b = _config(tmp_path, 40, "a.yaml"), _config(tmp_path, 41, "b.yaml")
    (tmp_path / "x").mkdir()
    same = _config(tmp_path / "x", 40, "a.yaml")  # another file, the same config
    assert teacher_dir(f"learned:{a}") == teacher_dir(f"learned:{same}")
    assert teacher_dir(f"learned:{a}").name.split("-")[-1] != teacher_dir(f"learned:{b}").name.split("-")[-1]
    assert teacher_dir("learned-digits").name.startswith("teacher_digits_bench-")


def test_bad_learned_targets_are_one_line_errors(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = tmp_path / "ring.yaml"
    ring.write_text(TINY.replace("STEPS", "10").replace("name: digits", "name: ring8"))
    for bad, needle in (
        ("learned:/nope/missing.yaml", "no teacher config file"),
        ("learned-digit", "learned-digits"),
        (f"learned:{ring}", "needs digits"),
    ):
        assert main(["bench", "--quick", "--run-dir", str(tmp_path), "--targets", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not cache.exists()  # nothing was trained


def test_teacher_training_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fewstep.benchmarks.leaderboard.learned import ensure_teacher

    target, files = f"learned:{_config(tmp_path, 20)}", []
    for cache in ("c1", "c2"):
        monkeypatch.setenv("FEWSTEP_BENCH_TEACHERS", str(tmp_path / cache))
        files.append(next(ensure_teacher(target).glob("ckpt-*/tensors.safetensors")).read_bytes())
    assert files[0] == files[1]
