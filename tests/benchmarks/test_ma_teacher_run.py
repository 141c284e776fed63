"""The MA sweep with a learned teacher (``--teacher-run``): arms build on a run folder, the MA term scores with the
score converted from the learned velocity, and a tiny sweep + report runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.benchmarks import ma_experiments as ME
from fewstep.benchmarks.ma_teacher_run import RUN_PREFIX, load_target, real_reference
from fewstep.cli import main as cli_main
from fewstep.config.build import build_method, load_run_student
from fewstep.methods._shared.alignment import end_score, window_logdensity
from fewstep.methods._shared.reflow_family import ma_term
from fewstep.teachers.module import ModuleTeacher

torch.set_num_threads(1)

HUTCH = '{"ma_mode": "hutchinson", "ma_solver": "rk4", "ma_substeps": 1, "ma_probes": 2, "ma_t_min": 0.05, ' \
        '"ma_batch": 16}'


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny flow-matching teacher on real digits (the learned-digits config, 3 steps, MLP 16 x 1)."""
    run = tmp_path_factory.mktemp("learned") / "teacher"
    rc = cli_main(["train-teacher", "--config", "configs/teacher_digits_bench.yaml", "--run-dir", str(run),
                   "student.hidden=16", "student.depth=1", "student.emb_dim=8", "train.steps=3",
                   "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1"])
    assert rc == 0 and (run / "config.yaml").is_file()
    return run


def _config(run: Path, tmp: Path, lam: float = 0.01):
    budget = ME.Budget(steps=2, batch=8, hidden=8, depth=1, n_pairs=64)
    arm = ME.Arm(f"MA {lam:g} start", lam, 0, budget.steps)
    ma = {"ma_mode": "exact", "ma_substeps": 1, "ma_solver": "rk4", "ma_t_min": 0.05, "ma_batch": 4}
    ov = ME.arm_overrides(RUN_PREFIX + str(run), arm, 0, budget, ma)
    line = ME.cli_line("reflow", ov, "runs/x")  # the printed user command parses back to the same config
    assert ME.arm_config("reflow", line.split(" --run-dir")[0].split()[4:], tmp) == ME.arm_config("reflow", ov, tmp)
    return ME.arm_config("reflow", ov, tmp)


def test_learned_arm_builds_on_the_run_folder(teacher_run: Path, tmp_path: Path) -> None:
    cfg = _config(teacher_run, tmp_path)
    assert cfg.teacher.kind == "run" and cfg.teacher.path == str(teacher_run)
    assert cfg.data.name == "digits" and cfg.data.kwargs == {"conditional": False, "split": "train"}
    method, dataset, teacher = build_method(cfg)
    assert isinstance(teacher, ModuleTeacher) and method.teacher is teacher
    assert tuple(dataset.event_shape) == (64,) and dataset.num_classes is None
    ref = real_reference(teacher_run)
    assert ref.shape == (359, 64) and ref.dtype == torch.float64  # the held-out test split
    assert isinstance(load_target(RUN_PREFIX + str(teacher_run)), ModuleTeacher)


def test_ma_term_scores_with_the_converted_learned_velocity(teacher_run: Path, tmp_path: Path) -> None:
    """lambda L_MA of the built method = lambda mean(Delta - <s, x_end>) with s computed by hand from the run's raw
    velocity network: s(x) = c s_T(c x, eps), s_T(y, t) = -(y + (1 - t) v(y, t)) / t, c = 1 - eps (window end 0)."""
    lam, eps = 0.01, 0.05
    method, _, teacher = build_method(_config(teacher_run, tmp_path, lam))
    net = load_run_student(teacher_run)  # the teacher's EMA velocity network, not through ModuleTeacher
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    term, _ = ma_term(method.student, teacher, method.config, x, 1.0, 0.0, None, step=0)
    x_end, delta = window_logdensity(method.student, x, torch.ones(4), torch.zeros(4), None, "exact", 1, "rk4")
    c = 1.0 - eps
    with torch.no_grad():
        y = c * x_end
        score = c * (-(y + (1 - eps) * net.velocity(y, torch.full((4,), eps))) / eps)
    expected = lam * (delta - (score * x_end).sum(1)).mean()
    torch.testing.assert_close(term, expected, rtol=1e-5, atol=1e-6)
    # a window end above eps: no rescaling, the score at the end time itself
    t = torch.full((4,), 0.3)
    with torch.no_grad():
        direct = -(x + 0.7 * net.velocity(x, t)) / 0.3
    torch.testing.assert_close(end_score(teacher, x, t, eps), direct, rtol=1e-5, atol=1e-6)


def test_learned_quick_sweep_and_report(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md = tmp_path / "ma.json", tmp_path / "ma.md"
    ME.main(["sweep", "--quick", "--teacher-run", str(teacher_run), "--ma", HUTCH, "--only", "base@N",
             "MA 0.001 start", "base@cpu", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    res = json.loads(out.read_text())
    tag = f"learned-{teacher_run.name}"
    assert res["settings"]["teacher_run"] == [str(teacher_run)] and len(res["runs"]) == 2 * 3
    for run in res["runs"].values():
        assert "teacher.kind=run" in run["cli"] and "tv_bound" not in run
        for k in ("1", "2", "4"):
            assert set(run["eval"][k]) == {"mmd2", "fd", "mmd2_teacher"}
    fl = res["floor"][tag]
    assert fl["n_real_test"] == 359 and fl["real_train"]["mmd2"] < fl["teacher_euler_1"]["mmd2"]
    ME.main(["report", str(out), "--out", str(md)])
    text = md.read_text()
    assert "MA with a learned teacher" in text and f"## {tag}" in text and "| MA 0.001 start | 4 |" in text
    assert "fd =steps" in text and "mmd2_teacher =CPU" in text
    capsys.readouterr()
    ME.main(["modes", str(out), "--nfe", "2"])  # a learned sweep has no components: the sample spread instead
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 2 + 3 and table[2].startswith("| real test digits | – | ")
    assert table[4].startswith(f"| {tag}/reflow/base@N | 2 | ")


def test_bad_teacher_run_exits_with_one_line(tmp_path: Path) -> None:
    from fewstep.benchmarks.ma_experiments import main as ma_main

    with pytest.raises(SystemExit, match=r"^--teacher-run: .*is not a fewstep run folder"):
        ma_main(["sweep", "--teacher-run", str(tmp_path / "missing"), "--quick", "--out", str(tmp_path / "x.json")])
