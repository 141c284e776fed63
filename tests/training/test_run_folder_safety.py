"""Run folders that cannot lie, and divergence that stops (issue 17, points 2 and 3), at the Trainer level."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from _trainer_helpers import ShiftedGaussian
from fewstep.training.checkpoint import CheckpointError, list_checkpoints
from fewstep.training.trainer import TrainConfig, Trainer

torch.set_num_threads(1)


def _trainer(run_dir: Path | None, steps: int = 4, resume: bool = False, **kw: object) -> Trainer:
    from fewstep.config.build import build_from_objects

    method, data = build_from_objects("flow_matching", None, ShiftedGaussian(), {}, {"hidden": 8, "depth": 1,
                                                                                     "emb_dim": 4}, 0)
    cfg = TrainConfig(steps=steps, batch_size=16, log_every=2, progress=False, tensorboard=False, **kw)
    return Trainer(method, data, cfg, run_dir=run_dir, resume=resume)


def test_non_finite_grad_norm_halts_like_a_non_finite_loss(tmp_path: Path) -> None:
    tr = _trainer(None, grad_clip=0.0)
    tr.prepare()
    for p in tr.method.student.parameters():
        p.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient (lr=30 without clipping)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm for 'student' at step 0"):
        tr.fit()
    assert all(bool(torch.isfinite(p).all()) for p in tr.method.student.parameters())  # no step was taken
    tr = _trainer(None, grad_clip=1.0)
    tr.prepare()
    for p in tr.method.student.parameters():
        p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        tr.fit()


def test_new_run_in_a_folder_with_checkpoints_is_refused(tmp_path: Path) -> None:
    _trainer(tmp_path, steps=6).fit()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(newest ckpt-6\); pass --resume"):
        _trainer(tmp_path, steps=2).fit()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]  # the old run is intact, not pruned or mixed


def test_final_checkpoint_is_written_before_the_final_evaluation(tmp_path: Path) -> None:
    from fewstep.training.callbacks import Callback

    class Boom(Callback):
        def on_eval(self, trainer: Trainer, step: int) -> None:
            raise ValueError("samples contain NaN or inf")

    tr = _trainer(tmp_path, steps=3)
    tr.callbacks.append(Boom())
    with pytest.raises(ValueError, match="NaN"):
        tr.fit()
    assert (tmp_path / "ckpt-3" / "COMPLETE").is_file()


def test_unwritable_run_folder_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def deny(self: Path, data: bytes) -> int:
        if ".write-test" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", deny)
    tr = _trainer(tmp_path / "ro", steps=3)
    with pytest.raises(PermissionError, match="is not writable"):
        tr.fit()
    assert tr.step == 0  # nothing was trained (and lost)


def test_resume_when_every_checkpoint_is_corrupt_is_an_error(tmp_path: Path) -> None:
    _trainer(tmp_path, steps=4, ckpt_every=2).fit()
    for _, folder in list_checkpoints(tmp_path):
        (folder / "tensors.safetensors").write_bytes(b"garbage")
    before = (tmp_path / "metrics.csv").read_text()
    with pytest.warns(UserWarning, match="skipping checkpoint"), \
            pytest.raises(CheckpointError, match="every checkpoint .* is incomplete or corrupt"):
        _trainer(tmp_path, steps=6, resume=True).fit()
    assert (tmp_path / "metrics.csv").read_text() == before
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]


def test_resume_without_any_checkpoint_starts_fresh(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, steps=2, resume=True)
    tr.fit()
    assert tr.step == 2 and (tmp_path / "ckpt-2" / "COMPLETE").is_file()
