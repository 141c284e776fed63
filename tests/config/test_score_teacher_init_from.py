"""k-rectified flow through a config: ``score_teacher`` (the MA target) and ``student.init_from`` (round k+1 starts
from round k), both reaching the method, with one-line errors; ``configs/reflow2_ma.yaml`` runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fewstep.cli import main
from fewstep.config.build import build_method, build_run, load_run, load_run_student
from fewstep.config.schema import RunConfig, load_config, to_dict
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.module import ModuleTeacher
from fewstep.training.checkpoint import load_latest

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["device=cpu", "student.hidden=8", "student.depth=1", "student.emb_dim=4", "train.batch_size=32",
        "train.tensorboard=false", "train.progress=false", "eval.nfe=[]", "method.cfg.n_pairs=64",
        "method.cfg.pair_steps=4"]
MA = ["method.cfg.ma_weight=1.0", "method.cfg.ma_mode=exact", "method.cfg.ma_substeps=2",
      "method.cfg.ma_solver=euler", "method.cfg.ma_batch=16"]


@pytest.fixture(scope="module")
def round1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step plain reflow run of ring8 (the round-1 run of a 2-rectified flow)."""
    run = tmp_path_factory.mktemp("k") / "r1"
    assert main(["distill", "--config", str(CONFIGS / "reflow.yaml"), "train.steps=3", "train.ema_decays=[0.5]",
                 *TINY, "--run-dir", str(run)]) == 0
    return run


def _round2(round1: Path, *extra: str) -> RunConfig:
    """Round 2 on the pairs of ``round1``: reflow + MA, teacher = the run (its EMA student's velocity)."""
    return load_config(None, ["method.name=reflow", "data.name=ring8", "teacher.kind=run",
                              f"teacher.path={round1}", *TINY, *MA, *extra])


def _ma_value(cfg: RunConfig) -> float:
    """The MA term (logged ``ma``) of the first training batch of the built run."""
    tr = build_run(cfg, with_eval=False)
    tr.prepare()
    torch.manual_seed(0)
    _, logs = tr.method.loss("student", tr.global_batch(0, "student"), 0)
    return logs["ma"]


def test_score_teacher_from_config_is_the_ma_target(round1: Path) -> None:
    init = [f"student.init_from={round1}"]  # the same student weights in every build
    scored = _round2(round1, *init, "score_teacher.kind=preset", "score_teacher.name=ring8")
    method, _, teacher = build_method(scored)
    assert isinstance(teacher, ModuleTeacher) and isinstance(method.score_teacher, GaussianMixtureTeacher)
    assert "score_teacher" not in dict(method.named_modules())
    with_score, without = _ma_value(scored), _ma_value(_round2(round1, *init))
    # the analytic teacher on ring8 pairs gives the same MA term: same student, same pair noise x1, same target
    analytic = _ma_value(load_config(None, ["method.name=reflow", "teacher.name=ring8", *TINY, *MA, *init]))
    assert with_score == pytest.approx(analytic, rel=1e-6, abs=1e-6)
    assert abs(with_score - without) > 1e-3 * (1 + abs(without))


def test_init_from_loads_the_previous_ema_student_bitwise(round1: Path) -> None:
    method, _, _ = build_method(_round2(round1, f"student.init_from={round1}"))
    _, tensors, state = load_latest(round1)  # read the checkpoint directly, not through load_run
    pre = f"ema/{float(state['ema']['decays'][0])!r}/"
    ema = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    raw = {k[len("method/student."):]: v for k, v in tensors.items() if k.startswith("method/student.")}
    got = method.student.state_dict()
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in got)
    assert not all(torch.equal(got[k], raw[k]) for k in got)  # the EMA copy, not the raw weights
    fresh, _, _ = build_method(_round2(round1))
    assert not all(torch.equal(fresh.student.state_dict()[k], got[k]) for k in got)
    tr = build_run(_round2(round1, f"student.init_from={round1}"), with_eval=False)
    tr.prepare()  # the EMA copies start from the loaded weights too
    assert all(torch.equal(v, ema[k]) for k, v in tr.student(ema=True).state_dict().items())


@pytest.mark.parametrize("method,extra,needle", [
    ("reflow", ["student.init_from=/nonexistent/run"],
     "student.init_from='/nonexistent/run': '/nonexistent/run' is not a fewstep run folder"),
    ("reflow", ["student.init_from={r1}", "student.hidden=16"],
     "its student does not match this one: 'net.net.0.bias' is (8,) there, (16,) here"),
    ("meanflow", ["score_teacher.kind=preset"],
     "score_teacher is set but method 'meanflow' has no marginal-alignment score target; only reflow, "
     "reflow_distill use it"),
    ("reflow", ["score_teacher.guidance=2"], "config key 'score_teacher.guidance' must be 1.0"),
    ("reflow", ["score_teacher.nme=ring8"], "unknown config key 'score_teacher.nme'"),
])
def test_one_line_errors(round1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str,
                         extra: list[str], needle: str) -> None:
    argv = ["distill", "--method", method, *TINY, "train.steps=1", *[e.format(r1=round1) for e in extra],
            "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_missing_checkpoint_is_one_line(round1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((round1 / "config.yaml").read_text())
    assert main(["distill", "--method", "reflow", *TINY, "train.steps=1", f"student.init_from={empty}",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"student.init_from={str(empty)!r}" in err and "has no checkpoint" in err


def test_unused_section_is_left_out_of_run_folders() -> None:
    assert "score_teacher" not in to_dict(RunConfig())  # old run folders and config hashes are unchanged
    assert to_dict(load_config(None, ["score_teacher.name=grid"]))["score_teacher"]["name"] == "grid"


def test_shipped_reflow2_ma_config_end_to_end(round1: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "reflow2_ma.yaml").read_text())
    assert raw["score_teacher"] == {"kind": "preset", "name": "ring8"} and raw["teacher"]["kind"] == "run"
    run = tmp_path / "r2"
    assert main(["distill", "--config", str(CONFIGS / "reflow2_ma.yaml"), f"teacher.path={round1}",
                 f"student.init_from={round1}", "train.steps=2", *TINY, "--run-dir", str(run)]) == 0
    loaded = load_run(run)  # the run folder rebuilds with its score teacher
    assert isinstance(loaded.method.score_teacher, GaussianMixtureTeacher)
    assert loaded.config.score_teacher is not None and loaded.config.method.cfg["ma_weight"] == 0.003
    assert load_run_student(run).state_dict().keys() == load_run_student(round1).state_dict().keys()
    raw = yaml.safe_load((run / "config.yaml").read_text())
    assert raw["student"]["init_from"] == str(round1) and raw["score_teacher"]["name"] == "ring8"
    raw["student"]["init_from"] = str(tmp_path / "gone")  # the run's checkpoint, not init_from, holds its weights
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    assert torch.equal(next(iter(load_run_student(run).state_dict().values())),
                       next(iter(loaded.student().state_dict().values())))
