"""Distributed: 2-process gloo training (torchrun) equals 1-process training with the same global batch."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep.training.distributed as D
from _trainer_helpers import flat_state, make_trainer, torchrun, two_net_method

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    import fewstep.training.distributed as D
    from _trainer_helpers import make_trainer, two_net_method

    rank, world, device = D.init_distributed("cpu")
    out_dir = sys.argv[1]
    # bucketed all-reduce: every rank holds grad = rank + 1 -> mean (1 + ... + W) / W
    lin = torch.nn.Linear(300, 300)
    for p in lin.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    calls = D.allreduce_gradients(lin, bucket_mb=0.1)
    ok = all(torch.allclose(p.grad, torch.full_like(p, (world + 1) / 2)) for p in lin.parameters())
    # a different init on rank 1 must be overwritten by rank 0's weights (broadcast at fit start)
    tr = make_trainer(two_net_method(seed=rank, jitter=0.0), run_dir=out_dir + "/run", steps=8, batch_size=32,
                      grad_accum=2, ckpt_every=4, ema_decays=[0.9])
    tr.fit()
    if rank == 0:
        state = {{"method/" + k: v.contiguous() for k, v in tr.method.state_dict().items()}}
        state.update({{"ema/" + k: v.contiguous() for k, v in tr.student(ema=True).state_dict().items()}})
        save_file(state, out_dir + "/final.safetensors")
        json.dump({{"calls": calls, "ok": ok, "world": world, "loss": tr.history[-1]["student/loss"]}},
                  open(out_dir + "/info.json", "w"))
    D.cleanup()
""").format(tests=str(TESTS))


def test_not_distributed_helpers() -> None:
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process() and not D.is_distributed()
    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.ones(2, 2)
    assert D.allreduce_gradients(lin) == 0
    assert torch.equal(lin.weight.grad, torch.ones(2, 2))
    assert torch.equal(D.all_reduce_mean(torch.tensor([3.0])), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        D.init_distributed("tpu")


def test_torchrun_two_processes_equal_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    res = torchrun([str(script), str(tmp_path)], timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    # 0.1 MiB buckets: the weight (352 KiB) goes alone, then the bias
    assert info["ok"] and info["world"] == 2 and info["calls"] == 2
    single = make_trainer(two_net_method(seed=0, jitter=0.0), steps=8, batch_size=32, grad_accum=2, ema_decays=[0.9])
    single.fit()
    multi = load_file(str(tmp_path / "final.safetensors"))
    ref = {"method/" + k: v for k, v in single.method.state_dict().items()}
    ref.update({"ema/" + k: v for k, v in single.student(ema=True).state_dict().items()})
    assert set(ref) == set(multi)
    # same global batches -> same weights up to float summation order (the jitter drawn from each rank's own
    # global RNG is switched off: methods that draw extra noise match only in distribution)
    worst = max(float((ref[k] - multi[k]).abs().max()) for k in ref)
    assert worst < 1e-5, worst
    assert info["loss"] == pytest.approx(single.history[-1]["student/loss"], rel=1e-5)
    assert (tmp_path / "run" / "ckpt-8" / "COMPLETE").is_file()


def test_flat_state_helper_detects_difference() -> None:
    a, b = two_net_method(seed=0), two_net_method(seed=1)
    assert (flat_state(a) - flat_state(b)).abs().max() > 1e-3


@pytest.mark.slow
def test_torchrun_cli_distill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = torchrun(["-m", "fewstep.cli", "distill", "--method", "flow_matching",
                    "--run-dir", str(run), "data.name=ring8", "device=cpu", "train.steps=6", "train.batch_size=32",
                    "student.hidden=16", "student.depth=1", "train.tensorboard=false", "train.log_every=3",
                    "eval.n_samples=100", "eval.nfe=[1]"], timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert (run / "ckpt-6" / "COMPLETE").is_file() and (run / "config.yaml").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 3
    assert res.stdout.decode().count("done: 6 steps") == 1  # rank 0 only
