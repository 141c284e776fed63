"""Issue 17 through the CLI a user runs: each method's own sampler, run folders that cannot lie, one-line errors,
metrics with context. Runs are tiny (a few steps of small MLPs) and in-process (``cli.main``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewstep.cli import main

torch.set_num_threads(1)
SMALL = ["device=cpu", "student.hidden=16", "student.depth=2", "student.emb_dim=8", "train.batch_size=64",
         "train.log_every=2", "train.tensorboard=false", "train.progress=false", "eval.nfe=[]"]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("fewstep: error:"), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fm") / "run"
    assert main(["distill", "--method", "flow_matching", "--run-dir", str(run), "data.name=ring8", "train.steps=4",
                 "method.cfg.cond_drop=0.0", *SMALL]) == 0
    return run


# ---------------------------------------------------------------- 1. the method's own sampler
def test_each_method_declares_its_sampler_and_the_run_folder_stores_it(fm_run: Path) -> None:
    from fewstep.methods.registry import get_method

    assert {n: get_method(n).sampler.gamma for n in ("cd", "ct", "scm", "facm")} == dict.fromkeys(
        ("cd", "ct", "scm", "facm"), 1.0)
    assert {n: get_method(n).sampler.gamma for n in ("meanflow", "imm", "shortcut", "reflow", "dmd2")} == dict.fromkeys(
        ("meanflow", "imm", "shortcut", "reflow", "dmd2"), 0.0)
    assert yaml.safe_load((fm_run / "config.yaml").read_text())["sampler"] == {"gamma": 0.0, "grid": "uniform"}


def test_exact_consistency_function_needs_gamma_1_not_deterministic_jumps() -> None:
    """A perfect consistency student (f_{t->0} = the teacher's ODE endpoint; the consistency parameterization then
    gives f_{t->s}(x) = (s/t) x + (1 - s/t) f_{t->0}(x)) is exact at every NFE with gamma = 1, while deterministic
    jumps through it are not: the sampler, not the training, is what fails (issue 17, point 1)."""
    from fewstep.evaluation.evaluate import noise, reference_samples
    from fewstep.evaluation.metrics import mmd2
    from fewstep.sampling.samplers import solve_adaptive
    from fewstep.sampling.spec import CONSISTENCY, DETERMINISTIC, sample_with
    from fewstep.teachers.presets import load_preset

    teacher = load_preset("ring8")

    def f(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: object = None) -> torch.Tensor:
        t0, s0 = float(t[0]), float(s[0])
        x0 = solve_adaptive(teacher, x.double(), t_start=t0, t_end=0.0, rtol=1e-5, atol=1e-5).x
        return (s0 / t0) * x + (1 - s0 / t0) * x0.to(x.dtype)

    n = 600
    x1, ref = noise(n, teacher, 0), reference_samples(teacher, n, 0)
    assert abs(mmd2(sample_with(f, x1, CONSISTENCY, 1).x, ref)) < 3e-3
    for k in (2, 4):  # exact at any NFE: re-noised samples are exact draws; one draw's MMD² at n=600 spreads ~±3e-3
        assert sum(mmd2(sample_with(f, x1, CONSISTENCY, k, seed=i).x, ref) for i in range(4)) / 4 < 3e-3
        assert mmd2(sample_with(f, x1, DETERMINISTIC, k).x, ref) > 0.01  # deterministic jumps blur the modes


def test_consistency_student_is_sampled_with_gamma_1_by_sample_and_eval(tmp_path: Path) -> None:
    from fewstep.benchmarks.method_bench import evaluate
    from fewstep.config.build import load_run

    run = tmp_path / "cd"
    assert main(["distill", "--method", "cd", "--run-dir", str(run), "train.steps=10", "train.lr=3e-3",
                 *SMALL]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["sampler"]["gamma"] == 1.0
    assert main(["eval", str(run), "--nfe", "2", "4", "--n", "200", "--out", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["sampler"] == {"gamma": 1.0, "grid": "uniform"} and got["checkpoint_step"] == 10
    loaded = load_run(run)
    student, mix = loaded.student(), loaded.teacher
    for k in (2, 4):  # the CLI reproduces method_bench's gamma = 1 path (the one behind docs/results.md) exactly
        assert got["student"][str(k)]["mmd2"] == pytest.approx(evaluate(student, mix, k, 200, 0, "gamma1")["mmd2"],
                                                               rel=1e-6, abs=1e-9)
        assert got["student"][str(k)]["mmd2"] != pytest.approx(evaluate(student, mix, k, 200, 0, "flowmap")["mmd2"],
                                                               rel=1e-3)
    assert main(["sample", str(run), "--nfe", "2", "--n", "20", "--out", str(tmp_path / "s")]) == 0
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["sampler"]["gamma"] == 1.0 and meta["checkpoint_step"] == 10
    assert main(["sample", str(run), "--nfe", "2", "--n", "20", "--gamma", "0.5", "--grid", "edm",
                 "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["sampler"] == {"gamma": 0.5, "grid": "edm"}


# ---------------------------------------------------------------- 2. run folders that cannot lie
def test_distill_into_a_used_folder_is_refused_unless_resume_or_overwrite(fm_run: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(fm_run, run)
    assert main(["distill", "--method", "flow_matching", "--run-dir", str(run), "data.name=ring8", "train.steps=2",
                 *SMALL]) == 2
    assert "already holds checkpoints (newest ckpt-4); pass --resume" in _one_line_error(capsys)
    assert main(["distill", "--method", "flow_matching", "--run-dir", str(run), "--overwrite", "data.name=ring8",
                 "train.steps=2", *SMALL]) == 0
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-2"]
    assert main(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s")]) == 0
    assert "loaded ckpt-2" in capsys.readouterr().out


def test_resume_with_a_bad_override_leaves_config_yaml_untouched(fm_run: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = (fm_run / "config.yaml").read_bytes()
    for bad in ("method.cfg.nope=1", "train.lrr=1", "eval.nfe=[0]"):
        assert main(["distill", "--run-dir", str(fm_run), "--resume", bad]) == 2
        _one_line_error(capsys)
        assert (fm_run / "config.yaml").read_bytes() == before


@pytest.mark.parametrize("override,needle", [("eval.nfe=[0]", "eval.nfe"), ("eval.n_samples=0", "eval.n_samples"),
                                             ("student.hidden=0", "student.hidden")])
def test_bad_eval_and_student_settings_are_refused_before_training(override: str, needle: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", "--method", "flow_matching", "--run-dir", str(tmp_path / "r"), *SMALL, override]) == 2
    assert needle in _one_line_error(capsys) and not (tmp_path / "r").exists()


def test_library_run_folder_is_usable_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import fewstep

    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    fewstep.train("cd", teacher="ring8", steps=2, run_dir=tmp_path / "lib", batch_size=16, progress=False,
                  tensorboard=False, student={"hidden": 8, "depth": 1})
    assert calls[0] == 1 and torch.get_num_threads() == before  # one thread while training (as the CLI), restored
    assert yaml.safe_load((tmp_path / "lib" / "config.yaml").read_text())["sampler"]["gamma"] == 1.0
    assert main(["sample", str(tmp_path / "lib"), "--nfe", "2", "--n", "5", "--out", str(tmp_path / "s")]) == 0
    assert "loaded ckpt-2" in capsys.readouterr().out


# ---------------------------------------------------------------- 3. faults reach the user as one line
def test_divergence_permission_corrupt_checkpoint_and_yaml_errors_are_one_line(
        fm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from fewstep.methods.flow_matching import FlowMatching

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    assert main(["distill", "--method", "flow_matching", "--config", str(bad)]) == 2
    assert "YAML syntax error" in _one_line_error(capsys)
    run = tmp_path / "corrupt"
    shutil.copytree(fm_run, run)
    (run / "ckpt-4" / "state.json").write_text("{}")
    assert main(["sample", str(run), "--n", "5"]) == 1
    assert "every checkpoint" in _one_line_error(capsys)
    monkeypatch.setattr(FlowMatching, "loss", lambda self, name, batch, step: (torch.tensor(float("nan")), {}))
    assert main(["distill", "--method", "flow_matching", "--run-dir", str(tmp_path / "nan"), "data.name=ring8",
                 "train.steps=3", *SMALL]) == 1
    assert "training diverged: non-finite loss" in _one_line_error(capsys)
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(self))) if ".write-test" in self.name else real(self, data))
    assert main(["distill", "--method", "flow_matching", "--run-dir", str(tmp_path / "ro"), *SMALL]) == 2
    assert "is not writable" in _one_line_error(capsys)


# ---------------------------------------------------------------- 4. bad input at the boundary
@pytest.mark.parametrize("argv,needle", [
    (["sample", "{run}", "--n", "0"], "--n must be >= 1"),
    (["sample", "{run}", "--n", "-5"], "--n must be >= 1"),
    (["sample", "{run}", "--nfe", "0"], "--nfe must be >= 1"),
    (["sample", "{run}", "--label", "3"], "unconditional"),
    (["sample", "{run}", "--grid", "1,0.5"], "not 0"),
    (["sample", "{run}", "--grid", "0,0.5,1"], "strictly decreasing"),
    (["sample", "{run}", "--grid", "1,a,0"], "--grid must be one of"),
    (["sample", "{run}", "--gamma", "2"], "--gamma must lie in [0, 1]"),
    (["eval", "{run}", "--n", "10"], "--n must be >= 100"),
    (["eval", "{run}", "--nfe", "0"], "--nfe must be >= 1"),
    (["distill", "--method", "flow_matching", "--config", "{tmp}"], "is a directory"),
    (["distill", "--method", "flow_matching", "--config", "{tmp}/none.yaml"], "none.yaml' does not exist"),
    (["distill", "--method", "flow_matching", "train.lr=.nan"], "must be a finite number"),
    (["distill", "--method", "flow_matching", "sampler.gamma=3"], "sampler.gamma"),
])
def test_bad_input_is_one_clear_line(argv: list[str], needle: str, fm_run: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(run=fm_run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert needle in _one_line_error(capsys)


def test_threads_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    for v in ("0", "-2"):
        with pytest.raises(SystemExit) as e:
            main(["--threads", v, "methods"])
        assert e.value.code == 2 and "--threads: must be >= 1" in capsys.readouterr().err


def test_partial_grid_needs_the_explicit_flag(fm_run: Path, tmp_path: Path) -> None:
    assert main(["sample", str(fm_run), "--grid", "1,0.5", "--allow-partial", "--n", "4",
                 "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["times"] == [1.0, 0.5]


def test_mixture_json_with_nan_or_strings_is_refused_at_load(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for i, w in enumerate(([float("nan")], ["a"])):
        f = tmp_path / f"m{i}.json"
        f.write_text(json.dumps({"weights": w, "means": [[0.0, 0.0]], "covariances": [[[1.0, 0.0], [0.0, 1.0]]]}))
        assert main(["distill", "--method", "cd", "teacher.kind=json", f"teacher.path={f}", *SMALL]) == 2
        assert ("must be finite numbers" if i == 0 else "must be (nested lists of) numbers") in _one_line_error(capsys)


def test_flow_map_input_checks() -> None:
    from fewstep.config.build import load_run_student
    from fewstep.core.flowmap import FlowMap
    from fewstep.networks.mlp import MLP

    f = FlowMap(MLP(2, hidden=8, depth=1), "average_velocity")
    with pytest.raises(ValueError, match=r"shape \(batch, 2\); got \(4, 3\)"):
        f(torch.randn(4, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="got s > t"):
        f(torch.randn(4, 2), 0.2, 0.7)
    y = f(torch.randn(4, 2, dtype=torch.float64), 1.0, 0.0)  # cast to the student's dtype
    assert y.dtype == torch.float32
    with pytest.raises(TypeError, match="floating-point"):
        f(torch.ones(4, 2, dtype=torch.long), 1.0, 0.0)
    from fewstep.teachers.presets import load_preset

    with pytest.raises(ValueError, match="n must be an int >= 0"):
        load_preset("ring8").sample(-1)
    del load_run_student


# ---------------------------------------------------------------- 5. metrics with context
def test_eval_of_a_learned_teacher_run_uses_held_out_data_and_draws_3d_pairs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mix = tmp_path / "m3.json"
    mix.write_text(json.dumps({"weights": [0.5, 0.5], "means": [[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0]],
                               "covariances": [np.eye(3).tolist(), (0.5 * np.eye(3)).tolist()]}))
    run3 = tmp_path / "r3"
    assert main(["distill", "--method", "cd", "--run-dir", str(run3), "teacher.kind=json", f"teacher.path={mix}",
                 "train.steps=2", *SMALL]) == 0
    assert main(["eval", str(run3), "--nfe", "1", "--n", "100"]) == 0
    assert (run3 / "eval.png").is_file() and "pairwise" not in capsys.readouterr().err
    teacher = tmp_path / "teacher"
    assert main(["train-teacher", "--data", "moons", "--run-dir", str(teacher), "train.steps=2", *SMALL]) == 0
    assert "'moons' is class-conditional (2 classes) by default" in capsys.readouterr().err
    run = tmp_path / "student"
    assert main(["distill", "--method", "meanflow", "--run-dir", str(run), "teacher.kind=run",
                 f"teacher.path={teacher}", "data.name=moons", "train.steps=2", *SMALL]) == 0
    assert main(["eval", str(run), "--nfe", "1", "2", "--n", "100", "--out", str(tmp_path / "e.json")]) == 0
    rec = json.loads((tmp_path / "e.json").read_text())
    assert rec["reference"].startswith("held-out moons data") and set(rec["teacher_euler"]) == {"1", "2"}
    assert rec["reference"].endswith("samples use its labels")  # conditional data: sampled per held-out label
    assert "mmd2" in rec["student"]["2"] and rec["teacher_adaptive"]["nfe"] > 2
    with pytest.warns(UserWarning, match="class-conditional .* no --label"):
        assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "u")]) == 0
    assert main(["sample", str(run), "--n", "4", "--label", "-3"]) == 2
    assert "--label must lie in 0..1" in _one_line_error(capsys)


def test_context_flags_say_what_a_metric_cannot_tell() -> None:
    from fewstep.cli_eval import context_flags

    floor = {"w2": 0.40, "mmd2": 1e-4, "mmd2_sd": 2e-4, "mean_loglik": -0.30}
    flags = context_flags({"w2": 0.41, "mmd2": 0.05, "mean_loglik": 0.10}, floor, 2000)
    assert any("W2 cannot tell" in f for f in flags) and any("modes are too narrow" in f for f in flags)
    assert context_flags({"w2": 0.9, "mmd2": 0.05, "mean_loglik": -0.5}, floor, 2000) == []


def test_help_says_moons_and_spirals_are_conditional(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train-teacher", "--help"])
    assert "class-conditional by default" in " ".join(capsys.readouterr().out.split())


def test_bad_input_table_lists_at_least_60_cases_none_a_traceback() -> None:
    from fewstep.benchmarks.bad_input import CASES

    assert len(CASES) >= 60
    rows = [r for r in (Path(__file__).resolve().parents[1] / "docs" / "bad_input.md").read_text().splitlines()
            if r.startswith("| ") and r.split("|")[1].strip().isdigit()]
    assert len(rows) == len(CASES)
    assert all(r.rstrip().endswith(("| clear error |", "| ok (runs) |")) for r in rows)
