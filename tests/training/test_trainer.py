"""Trainer: LR schedules, EMA math, accumulation equivalence, determinism, in-process resume, batches."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from _trainer_helpers import ShiftedGaussian, flat_state, fm_method, make_trainer, two_net_method
from fewstep.config.schema import TrainConfig
from fewstep.training.trainer import EMA, Callback, Trainer, derive_seed, lr_factor

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind,step,expected", [
    ("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 10, 1.0),
    ("cosine", 60, 0.1 + 0.9 * 0.5), ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 110, 0.1), ("linear", 35, 1 - 0.9 * 0.25), ("linear", 110, 0.1), ("constant", 80, 1.0),
    ("constant", 4, 0.5),
])
def test_lr_factor_values(kind: str, step: int, expected: float) -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_schedule=kind, min_lr_ratio=0.1)
    assert lr_factor(step, cfg) == pytest.approx(expected, abs=1e-12)


def test_lr_applied_to_optimizer_each_step() -> None:
    tr = make_trainer(fm_method(), steps=8, warmup_steps=4, lr_schedule="linear", min_lr_ratio=0.0, lr=0.1,
                      log_every=1)
    tr.fit()
    lrs = [row["student/lr"] for row in tr.history]
    expected = [0.1 * (k + 1) / 4 for k in range(4)] + [0.1 * (1 - k / 4) for k in range(4)]
    assert lrs == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_closed_form_without_warmup() -> None:
    p = nn.Linear(1, 1, bias=False)
    nn.init.constant_(p.weight, 0.0)
    ema = EMA(p, [0.9, 0.5], warmup=False)
    with torch.no_grad():
        p.weight.fill_(1.0)
    for _ in range(5):
        ema.update(p)
    # theta_0 = 0 then constant 1: ema_n = 1 - d^n
    assert float(ema.copies[0.9].weight) == pytest.approx(1 - 0.9**5, abs=1e-6)
    assert float(ema.copies[0.5].weight) == pytest.approx(1 - 0.5**5, abs=1e-6)
    assert not ema.copies[0.9].weight.requires_grad


def test_ema_warmup_decay_sequence() -> None:
    p = nn.Linear(1, 1, bias=False)
    nn.init.constant_(p.weight, 0.0)
    ema = EMA(p, [0.999], warmup=True)
    values = [1.0, 2.0, 3.0]
    expected = 0.0
    for n, v in enumerate(values):
        d = min(0.999, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * v
        with torch.no_grad():
            p.weight.fill_(v)
        ema.update(p)
    assert float(ema.copies[0.999].weight) == pytest.approx(expected, abs=1e-6)


def test_student_ema_differs_from_raw_and_is_flowmap() -> None:
    tr = make_trainer(fm_method(), steps=5, ema_decays=[0.9, 0.99])
    tr.fit()
    raw, ema = tr.student(ema=False), tr.student(ema=True)
    assert type(ema).__name__ == "FlowMap" and ema.parameterization == raw.parameterization
    assert (flat_state(raw) - flat_state(ema)).abs().max() > 1e-4
    assert tr.student(decay=0.99) is tr.ema.copies[0.99]
    with pytest.raises(ValueError, match="no EMA with decay 0.5"):
        tr.student(decay=0.5)


# ---------------------------------------------------------------------------------------------- equivalences
def test_grad_accumulation_equals_full_batch() -> None:
    a = make_trainer(fm_method(), steps=6, batch_size=32, grad_accum=1)
    b = make_trainer(fm_method(), steps=6, batch_size=32, grad_accum=4)
    a.fit()
    b.fit()
    assert torch.allclose(flat_state(a.method.student), flat_state(b.method.student), atol=2e-6)
    assert a.history[-1]["student/loss"] == pytest.approx(b.history[-1]["student/loss"], rel=1e-5)


def test_same_seed_bitwise_equal_other_seed_differs() -> None:
    runs = []
    for seed in (0, 0, 1):
        tr = make_trainer(two_net_method(), steps=6, seed=seed)
        tr.fit()
        runs.append(flat_state(tr.method))
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max() > 1e-4


def test_multi_network_schedule_counts_and_lr_override() -> None:
    tr = make_trainer(two_net_method(), steps=4, lr_overrides={"aux": 0.5}, log_every=1)
    tr.fit()
    aux_steps = [int(s["step"]) for s in tr.optimizers["aux"].state.values()]
    stu_steps = [int(s["step"]) for s in tr.optimizers["student"].state.values()]
    assert set(aux_steps) == {8} and set(stu_steps) == {4}
    assert tr.history[-1]["aux/lr"] == 0.5 and tr.history[-1]["student/lr"] == pytest.approx(1e-2)
    assert tr.method.after_calls[:3] == [("aux", 0), ("aux", 0), ("student", 0)]
    with pytest.raises(ValueError, match="lr_overrides names unknown networks"):
        make_trainer(two_net_method(), steps=1, lr_overrides={"fake": 1.0}).fit()


class _Crash(Callback):
    """Raise after a given step, like a killed process (the checkpoint before it survives)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        if step + 1 == self.at:
            raise RuntimeError("simulated crash")


def test_resume_in_process_matches_uninterrupted(tmp_path) -> None:
    kw = dict(steps=12, ckpt_every=4, lr_schedule="cosine", warmup_steps=3, ema_decays=[0.9], log_every=2)
    ref = make_trainer(two_net_method(), **kw)
    ref.fit()
    crashed = make_trainer(two_net_method(), run_dir=tmp_path, **kw)
    crashed.callbacks.append(_Crash(at=7))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed = make_trainer(two_net_method(seed=5), run_dir=tmp_path, **kw)  # other init: must be overwritten
    resumed.resume = True
    resumed.fit()
    assert resumed.step == 12
    assert torch.equal(flat_state(ref.method), flat_state(resumed.method))
    assert torch.equal(flat_state(ref.student(ema=True)), flat_state(resumed.student(ema=True)))
    with open(tmp_path / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [2, 4, 6, 8, 10, 12]


# ---------------------------------------------------------------------------------------------- batches
def test_global_batch_is_deterministic_and_sharded_exactly() -> None:
    tr = make_trainer(fm_method(), batch_size=16, grad_accum=2, labels=True, seed=3)
    b1, b2 = tr.global_batch(7, "student"), tr.global_batch(7, "student")
    assert torch.equal(b1.x0, b2.x0) and torch.equal(b1.u, b2.u) and torch.equal(b1.cond, b2.cond)
    assert not torch.equal(tr.global_batch(8, "student").x1, b1.x1)
    shards = tr.shards(b1)
    assert [s.size for s in shards] == [8, 8]
    assert torch.equal(torch.cat([s.x1 for s in shards]), b1.x1)
    assert b1.u.shape == (16, 8) and float(b1.u.min()) >= 0 and float(b1.u.max()) < 1
    assert derive_seed(1, 2, "a") == derive_seed(1, 2, "a") != derive_seed(1, 2, "b")


def test_trainer_input_errors() -> None:
    with pytest.raises(ValueError, match="needs data"):
        Trainer(fm_method(), None, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="batch_size=30 must be divisible by train.grad_accum=4"):
        TrainConfig(batch_size=30, grad_accum=4)
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer(fm_method(), ShiftedGaussian(), {"steps": 1})  # type: ignore[arg-type]


def test_training_reduces_flow_matching_loss(tmp_path) -> None:
    tr = make_trainer(fm_method(), run_dir=tmp_path, steps=150, batch_size=128, lr=3e-3, log_every=25)
    tr.fit()
    first, last = tr.history[0]["student/loss"], tr.history[-1]["student/loss"]
    # FM loss on N(m, 0.25 I) -> the minimum is E|x1-x0|^2 minus explained variance, well below the start
    assert last < 0.75 * first
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "student/loss", "student/lr", "student/grad_norm", "it_per_s"} <= set(header)
    assert (tmp_path / "ckpt-150" / "COMPLETE").is_file()


def test_csv_logger_grows_header_truncates_on_resume_and_writes_tensorboard(tmp_path) -> None:
    from fewstep.training.callbacks import CSVLogger

    log = CSVLogger(tmp_path, tensorboard=True)
    log.log(1, {"a": 1.0})
    log.log(2, {"a": 2.0, "b": 5.0})  # new key -> header rewritten
    log.log(3, {"a": 3.0})
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[1]["b"] == "5.0" and rows[0]["b"] == ""
    assert any((tmp_path / "tb").glob("events.out.tfevents.*"))
    CSVLogger(tmp_path, tensorboard=False, start_step=2).close()  # resume from step 2 drops step 3
    with open(tmp_path / "metrics.csv") as f:
        assert [float(r["a"]) for r in csv.DictReader(f)] == [1.0, 2.0]
