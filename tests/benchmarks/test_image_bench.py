"""End to end on images: train a tiny U-Net teacher, distill it (reflow, meanflow), sample, evaluate, grid PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.benchmarks.image_bench import image_mosaic, save_grid, student_rows, teacher_rows
from fewstep.cli import main
from fewstep.cli_eval_images import real_floor
from fewstep.evaluation.image_features import FLOOR_N, fd_floor

torch.set_num_threads(1)

TINY = ["student.hidden=8", "student.emb_dim=8", "train.batch_size=8", "train.log_every=1"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("images") / "teacher"
    rc = main(["train-teacher", "--config", "configs/images/teacher_digits8.yaml", "--run-dir", str(run),
               *TINY, "train.steps=3", "train.ckpt_every=0"])
    assert rc == 0 and (run / "config.yaml").is_file()
    return run


def test_tiny_teacher_distill_sample_eval(teacher_run: Path, tmp_path: Path) -> None:
    student = tmp_path / "reflow"
    rc = main(["distill", "--config", "configs/images/reflow.yaml", "--run-dir", str(student), *TINY,
               f"teacher.path={teacher_run}", f"student.init_from={teacher_run}", "train.steps=2",
               "method.cfg.n_pairs=16", "method.cfg.pair_steps=2"])
    assert rc == 0
    rc = main(["sample", str(student), "--nfe", "2", "--n", "12", "--label", "3", "--out", str(tmp_path / "s")])
    assert rc == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (12, 1, 8, 8) and np.isfinite(x).all() and (tmp_path / "s.png").is_file()
    rows = student_rows(student, nfe=(1, 2), n=20)
    assert [r["nfe"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["fd"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["class_acc"] <= 1
    (row,) = student_rows(student, n=20, gamma=0.5, grid="1,0.4,0")  # sampler override: explicit times set NFE
    assert row["sampler"] == "reflow gamma=0.5 grid=1,0.4,0 2" and row["nfe"] == 2 and np.isfinite(row["fd"])
    t_rows = teacher_rows(teacher_run, n=20, steps=(1,))
    assert [r["sampler"] for r in t_rows][0] == "Euler 1" and t_rows[-1]["nfe"] > 1  # + adaptive dopri5
    # `fewstep eval` on an image run prints the benchmark's numbers (same noise, labels, reference) and the bars
    out = tmp_path / "eval.json"
    assert main(["eval", str(student), "--nfe", "1", "2", "--n", "100", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    bench = student_rows(student, nfe=(1, 2), n=100)
    assert [rec["student"][k]["fd"] for k in ("1", "2")] == pytest.approx([r["fd"] for r in bench], rel=1e-9)
    assert rec["student"]["1"]["class_acc"] == pytest.approx(bench[0]["class_acc"])
    assert sorted(rec["teacher_euler"], key=int) == ["1", "2", "4", "8"]
    euler = teacher_rows(teacher_run, n=100, steps=(4, 8))
    assert rec["teacher_euler"]["4"]["fd"] == pytest.approx(euler[0]["fd"], rel=1e-9)
    assert rec["teacher_adaptive"]["fd"] == pytest.approx(euler[-1]["fd"], rel=1e-6)
    for k, want in (("1", "4"), ("2", "8")):
        bar = rec["bars"][k]
        assert bar["euler_fd"] == rec["teacher_euler"][want]["fd"] and bar["fd"] == rec["student"][k]["fd"]
        assert bar["met"] == (bar["fd"] < bar["euler_fd"])
    # the floor is measured at the same n as the student (FD's small-n bias), not the shipped n = 898 one
    assert rec["floor_exact_vs_exact"]["fd"] == pytest.approx(fd_floor("digits8", 100)["fd"], rel=1e-9)


def test_eval_of_a_data_trained_method_builds_its_teacher_for_the_bars(teacher_run: Path, tmp_path: Path) -> None:
    """IMM trains from data (no teacher in the method), but its config names the teacher whose bars judge it:
    `fewstep eval` builds it for the Euler rows; with that folder gone the student is still scored, and the
    reference line says why the teacher rows are missing."""
    run = tmp_path / "imm"
    assert main(["distill", "--config", "configs/images/imm.yaml", "--run-dir", str(run), *TINY,
                 f"teacher.path={teacher_run}", "train.steps=2"]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--nfe", "1", "--n", "100", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert sorted(rec["teacher_euler"], key=int) == ["1", "4"] and rec["bars"]["1"]["euler_nfe"] == 4
    cfg = (run / "config.yaml").read_text().replace(str(teacher_run), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(cfg)
    assert main(["eval", str(run), "--nfe", "1", "--n", "100", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["teacher_euler"] == {} and rec["bars"] == {} and "no teacher rows" in rec["reference"]
    assert rec["student"]["1"]["fd"] > 0


def test_eval_floor_at_the_evaluated_n() -> None:
    """`fewstep eval`'s real-vs-real floor: the shipped one at n = 898, measured at any other n up to half the set
    (FD at n = 100 is several times the n = 898 floor), none beyond it."""
    shipped = real_floor("digits8", FLOOR_N["digits8"])
    assert shipped["fd"] == pytest.approx(fd_floor("digits8")["fd"], rel=1e-4)
    small = real_floor("digits8", 100)
    assert small == fd_floor("digits8", 100) and small["fd"] > 2 * shipped["fd"]
    assert real_floor("digits8", 899) == {}


def test_tiny_meanflow_on_dit(teacher_run: Path, tmp_path: Path) -> None:
    """A JVP method with the DiT backbone through the CLI (torch.func.jvp through attention)."""
    run = tmp_path / "mf"
    rc = main(["distill", "--config", "configs/images/meanflow.yaml", "--run-dir", str(run), *TINY,
               f"teacher.path={teacher_run}", "student.kind=dit", "student.options={patch_size: 4, heads: 2}",
               "train.steps=2"])
    assert rc == 0
    assert student_rows(run, nfe=(1,), n=20)[0]["fd"] > 0


def test_sample_grid_png(tmp_path: Path) -> None:
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    out = save_grid({"a 1": x, "b 2": -x}, tmp_path / "g.png")
    assert out.is_file() and out.stat().st_size > 1000
    m = image_mosaic(x[:6], cols=3)
    assert m.shape == (2 * 9, 3 * 9) and float(m[8, 0]) == -1.0  # gap rows are background
    assert np.allclose(m[:8, :8], x[0, 0].numpy())
    assert image_mosaic(torch.zeros(2, 3, 4, 4)).shape == (5, 2 * 5, 3)  # one row of two RGB images


def test_sample_class_grid(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fewstep sample --class-grid`: one row per class, one column per NFE; same noise in every column."""
    from fewstep.config.build import load_run
    from fewstep.sampling.image_grid import class_grid_samples

    out = tmp_path / "grid"
    assert main(["sample", str(teacher_run), "--class-grid", "1", "2", "--out", str(out)]) == 0
    png = out.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 1000
    assert "columns: NFE 1 2" in capsys.readouterr().out
    run = load_run(teacher_run)
    cols = class_grid_samples(run.student(), run.sampler, [1, 3], num_classes=10, per_cell=2)
    assert list(cols) == ["1 NFE", "3 NFE"] and all(x.shape == (20, 1, 8, 8) for x in cols.values())
    assert not torch.allclose(cols["1 NFE"], cols["3 NFE"])
    again = class_grid_samples(run.student(), run.sampler, [1], num_classes=10, per_cell=2)
    assert torch.equal(again["1 NFE"], cols["1 NFE"])  # the noise is fixed by the seed
    assert main(["sample", str(teacher_run), "--class-grid", "2", "--grid", "1,0.5,0", "--out", str(out)]) == 2
    assert "--class-grid sets the step counts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="per_cell"):
        class_grid_samples(run.student(), run.sampler, [1], num_classes=10, per_cell=0)


def test_image_cost_measure(teacher_run: Path) -> None:
    """benchmarks.image_cost: CPU time and memory of training steps; the table's ratio is relative to FM."""
    from fewstep.benchmarks.image_cost import markdown, measure

    row = measure("configs/images/teacher_digits8.yaml", [*TINY, "train.steps=3"], steps=1)
    assert row["method"] == "flow_matching" and row["batch"] == 8
    assert row["cpu_s"] > 0 and row["wall_s"] > 0 and row["peak_rss_mib"] > 50 and row["train_rss_mib"] >= 0
    mf = measure("configs/images/meanflow.yaml", [*TINY, f"teacher.path={teacher_run}"], steps=1)
    table = markdown([row, {**mf, "cpu_s": 2.5 * row["cpu_s"]}])
    assert "| flow_matching | teacher_digits8.yaml | 8 |" in table and "| 1.00 |" in table and "| 2.50 |" in table
