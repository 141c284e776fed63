"""image_anchor_stats: the t = 1 row is the 1-NFE sample and the last row the K-NFE sample (tiny ddmd run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep.benchmarks.image_anchor_stats import anchor_rows, main, pixel_stats
from fewstep.benchmarks.image_bench import eval_noise
from fewstep.cli import main as cli
from fewstep.config.build import load_run
from fewstep.sampling.spec import sample_with

torch.set_num_threads(1)
TINY = ["student.hidden=8", "student.emb_dim=8", "train.batch_size=8", "train.ckpt_every=0", "train.steps=2"]


@pytest.fixture(scope="module")
def tiny_ddmd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("anchor_stats")
    teacher, run = root / "teacher", root / "ddmd"
    assert cli(["train-teacher", "--config", "configs/images/teacher_digits8.yaml", "--run-dir", str(teacher),
                *TINY]) == 0
    assert cli(["distill", "--config", "configs/images/ddmd.yaml", "--run-dir", str(run), *TINY,
                f"teacher.path={teacher}", f"student.init_from={teacher}"]) == 0
    return run


def test_pixel_stats() -> None:
    s = pixel_stats(torch.tensor([[-3.0, 1.0], [1.0, 1.0]]))
    assert s == pytest.approx({"std": 2.0, "mean": 0.0, "max_abs": 3.0})


def test_rows_are_the_samples(tiny_ddmd: Path, tmp_path: Path) -> None:
    rows = anchor_rows(tiny_ddmd, steps=2, n=20)
    assert [r["t"] for r in rows] == [1.0, 0.5]
    run = load_run(tiny_ddmd)
    f = run.student(ema=True)
    x1, cond = eval_noise(20, f.net.event_shape, f.net.num_classes, 0)
    for row, k in zip(rows, (1, 2), strict=True):
        x = sample_with(f, x1, run.sampler, nfe=k, cond=cond, seed=0).x
        assert row["std"] == pytest.approx(pixel_stats(x)["std"], rel=1e-5)
        assert row["max_abs"] == pytest.approx(pixel_stats(x)["max_abs"], rel=1e-5)
    out = tmp_path / "t.md"
    assert main([str(tiny_ddmd), "--steps", "2", "--n", "20", "--out", str(out)]) == 0
    assert out.read_text().count("\n") == 5  # header, rule, real row, 2 anchors
