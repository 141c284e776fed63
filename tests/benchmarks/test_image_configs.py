"""Every shipped image config (configs/images/*.yaml) loads and trains 2 steps against a tiny digits8 teacher.

The configs are used unchanged except for sizes (width, batch, pair counts) so the test stays fast; the teacher
path and ``student.init_from`` point at a 3-step tiny teacher trained here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from fewstep.cli import main

torch.set_num_threads(1)

CONFIGS = sorted(Path("configs/images").glob("*.yaml"))
TINY = [
    "student.hidden=8",
    "student.emb_dim=8",
    "train.batch_size=8",
    "train.log_every=1",
    "train.steps=2",
    "train.ckpt_every=0",
]
#: Per-method overrides that only shrink work done once in prepare() (cached pairs).
SMALL = {"reflow": ["method.cfg.n_pairs=16", "method.cfg.pair_steps=2"], "dmd": ["method.cfg.num_pairs=16"]}


#: Teacher run folder named in a config -> the teacher config whose tiny version replaces it (the *_lowfreq configs
#: load a teacher with the students' low-frequency time embedding through student.init_from).
TEACHER_CONFIGS = {
    "runs/images/teacher-digits8": "configs/images/teacher_digits8.yaml",
    "runs/images/teacher-digits8-lowfreq": "configs/images/teacher_digits8_lowfreq.yaml",
}


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_configs")
    runs = {}
    for name, config in TEACHER_CONFIGS.items():
        run = root / Path(name).name
        over = [*TINY[:-2], "train.steps=3", "train.ckpt_every=0"]
        assert main(["train-teacher", "--config", config, "--run-dir", str(run), *over]) == 0
        runs[name] = run
    return runs


def test_every_method_has_an_image_config() -> None:
    names = {yaml.safe_load(p.read_text())["method"]["name"] for p in CONFIGS}
    want = {
        "flow_matching",
        "reflow",
        "perflow",
        "meanflow",
        "splitmeanflow",
        "cd",
        "ct",
        "scm",
        "facm",
        "ayf_emd",
        "ayf_lmd",
        "shortcut",
        "imm",
        "dmd",
        "dmd2",
        "ddmd",
        "cdm",
    }
    assert want <= names, sorted(want - names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_image_config_trains_two_steps(path: Path, tiny_teachers: dict[str, Path], tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    method = raw["method"]["name"]
    over = [*TINY, *SMALL.get(method, [])]
    if raw.get("teacher"):
        over.append(f"teacher.path={tiny_teachers[raw['teacher']['path']]}")
    if raw["student"].get("init_from"):
        over.append(f"student.init_from={tiny_teachers[raw['student']['init_from']]}")
    cmd = "train-teacher" if method == "flow_matching" else "distill"
    run = tmp_path / path.stem
    assert main([cmd, "--config", str(path), "--run-dir", str(run), *over]) == 0
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    losses = [float(v) for r in rows for k, v in r.items() if k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
