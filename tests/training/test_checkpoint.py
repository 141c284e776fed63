"""Checkpoints: round trip, checksums, corrupted/truncated detection with fallback, pruning, SIGKILL resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _trainer_helpers import make_trainer, two_net_method
from fewstep.training.checkpoint import (
    COMPLETE,
    CheckpointError,
    flatten_tensors,
    list_checkpoints,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
    sha256_file,
    unflatten_tensors,
    verify_checkpoint,
)

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parents[1]


def _save(run: Path, step: int, value: float) -> Path:
    return save_checkpoint(run, step, {"w": torch.full((3, 2), value), "b": torch.arange(4)}, {"step": step})


def test_round_trip_and_checksums(tmp_path: Path) -> None:
    folder = _save(tmp_path, 5, 1.5)
    marker = json.loads((folder / COMPLETE).read_text())
    assert marker["step"] == 5
    for name, digest in marker["files"].items():
        assert sha256_file(folder / name) == digest and len(digest) == 64
    step, tensors, state = load_latest(tmp_path)
    assert step == 5 and state == {"step": 5}
    assert torch.equal(tensors["w"], torch.full((3, 2), 1.5)) and torch.equal(tensors["b"], torch.arange(4))
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no temp files left behind


@pytest.mark.parametrize("damage,needle", [
    ("flip", "tensors.safetensors' is truncated or corrupted"),
    ("truncate", "tensors.safetensors' is truncated or corrupted"),
    ("state", "state.json' is truncated or corrupted"),
    ("marker", "is incomplete: no COMPLETE marker"),
])
def test_damaged_newest_checkpoint_is_skipped_with_warning(tmp_path: Path, damage: str, needle: str) -> None:
    _save(tmp_path, 10, 1.0)
    bad = _save(tmp_path, 20, 2.0)
    if damage == "flip":
        data = bytearray((bad / "tensors.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (bad / "tensors.safetensors").write_bytes(bytes(data))
    elif damage == "truncate":
        data = (bad / "tensors.safetensors").read_bytes()
        (bad / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "state":
        (bad / "state.json").write_text('{"step": 2')
    else:
        (bad / COMPLETE).unlink()
    with pytest.warns(UserWarning, match=needle):
        step, tensors, _ = load_latest(tmp_path)
    assert step == 10 and torch.equal(tensors["w"], torch.full((3, 2), 1.0))
    with pytest.raises(CheckpointError, match="ckpt-20"):
        verify_checkpoint(bad)


def test_no_valid_checkpoint_returns_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "missing") is None
    (tmp_path / "ckpt-3").mkdir()
    with pytest.warns(UserWarning, match="ckpt-3"):
        assert load_latest(tmp_path) is None


def test_prune_keeps_newest(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, float(s))
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(1)}, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 4]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(tmp_path, 0)


def test_flatten_optimizer_state_round_trip() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    skel = flatten_tensors(opt.state_dict(), "optim", tensors)
    json.dumps(skel)  # JSON-able
    back = unflatten_tensors(json.loads(json.dumps(skel)), tensors)
    assert set(back["state"]) == {0}
    assert torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["param_groups"][0]["lr"] == 0.1


KW = dict(steps=60, ckpt_every=10, keep_checkpoints=2, lr_schedule="cosine", warmup_steps=5, ema_decays=[0.9, 0.99])
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from _trainer_helpers import make_trainer, two_net_method
    from fewstep.training.trainer import Callback

    class Slow(Callback):
        def on_step_end(self, trainer, step, logs):
            time.sleep(0.02)

    run_dir, resume = sys.argv[1], sys.argv[2] == "1"
    tr = make_trainer(two_net_method(), run_dir=run_dir, **{kw!r})
    tr.resume = resume
    tr.callbacks.append(Slow())
    tr.fit()
    out = {{"method/" + k: v for k, v in tr.method.state_dict().items()}}
    out.update({{"ema/" + k: v for k, v in tr.student(ema=True, decay=0.99).state_dict().items()}})
    save_file({{k: v.contiguous() for k, v in out.items()}}, run_dir + "/final.safetensors")
""").format(tests=str(TESTS), kw=KW)


def _run(script: Path, run_dir: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(script), str(run_dir), "1" if resume else "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    kill_dir = tmp_path / "killed"
    victim = _run(script, kill_dir, False)
    deadline = time.time() + 60
    while not (kill_dir / "ckpt-20" / COMPLETE).exists():
        assert victim.poll() is None, victim.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "no checkpoint after 60 s"
        time.sleep(0.01)
    time.sleep(0.15)  # a few steps past the checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (kill_dir / "final.safetensors").exists()
    resumed = _run(script, kill_dir, True)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert "resumed from" in err.decode()
    ref = make_trainer(two_net_method(), **KW)  # uninterrupted, in this process
    ref.fit()
    a = {"method/" + k: v for k, v in ref.method.state_dict().items()}
    a.update({"ema/" + k: v for k, v in ref.student(ema=True, decay=0.99).state_dict().items()})
    b = load_file(str(kill_dir / "final.safetensors"))
    assert set(a) == set(b) and len(a) > 4
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert [s for s, _ in list_checkpoints(kill_dir)] == [60, 50]
