"""train.fsdp with a diffusers student: 2-process torchrun `fewstep distill` of a tiny SD3 (reflow, meanflow) shards
the student network and ends at the weights of 1-process training."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _diffusers_fixtures import save_sd3_folder
from _trainer_helpers import torchrun
from fewstep.cli import main
from fewstep.training.checkpoint import load_checkpoint

METHOD_CFG = {"reflow": {"n_pairs": 8, "pair_steps": 4, "pair_solver": "euler"}, "meanflow": {}}

# Runs both methods through the CLI under torchrun; records whether shard_student sharded every parameter.
SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import fewstep.training.trainer as T
    from fewstep.cli import main
    from fewstep.training.fsdp import is_sharded

    out, sharded, shard = sys.argv[1], [], T.shard_student

    def recording_shard(student, world, device):
        net = shard(student, world, device)
        sharded.append(type(net).__name__ if all(is_sharded(p) for p in net.parameters()) else "unsharded")
        return net

    T.shard_student = recording_shard
    for m in ("reflow", "meanflow"):
        assert main(["distill", "--config", f"{out}/{m}.yaml", "--run-dir", f"{out}/fsdp-{m}", "train.fsdp=true"]) == 0
    json.dump(sharded, open(f"{out}/sharded-{os.environ['RANK']}.json", "w"))
""")


def _last_loss(run: Path) -> float:
    return float(list(csv.DictReader((run / "metrics.csv").open()))[-1]["student/loss"])


@pytest.mark.slow
def test_torchrun_fsdp_diffusers_student_equals_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder, cond = save_sd3_folder(tmp_path)
    for method, mcfg in METHOD_CFG.items():
        cfg = {"seed": 0, "device": "cpu", "teacher": {"kind": "diffusers", "path": str(folder), "guidance": 2.0},
               "data": {"name": "embeddings", "kwargs": {"path": str(cond)}}, "student": {"kind": "teacher"},
               "method": {"name": method, "cfg": mcfg},
               "train": {"steps": 4, "batch_size": 4, "lr": 1e-4, "ema_decays": [0.9], "ckpt_every": 4,
                         "progress": False, "tensorboard": False, "log_every": 1},
               "eval": {"nfe": []}}
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    script = tmp_path / "fsdp_script.py"
    script.write_text(SCRIPT)
    res = torchrun([str(script), str(tmp_path)], timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    for rank in (0, 1):  # the whole student network (gap embeddings included) is one FSDP unit on each rank
        assert json.loads((tmp_path / f"sharded-{rank}.json").read_text()) == ["FSDPDiffusersFlowMapNet"] * 2
    init = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    for method in METHOD_CFG:
        one = tmp_path / f"one-{method}"
        assert main(["distill", "--config", str(tmp_path / f"{method}.yaml"), "--run-dir", str(one)]) == 0
        ref, _ = load_checkpoint(one / "ckpt-4")
        got, state = load_checkpoint(tmp_path / f"fsdp-{method}" / "ckpt-4")  # full tensors, one process
        keys = {k for k in ref if k.startswith(("method/", "ema/"))}
        assert keys == {k for k in got if k.startswith(("method/", "ema/"))} and state["step"] == 4
        worst = max(float((ref[k] - got[k]).abs().max()) for k in keys)
        assert worst < 1e-5, (method, worst)
        moved = max(float((ref["method/student.net.denoiser.model." + k] - v).abs().max()) for k, v in init.items())
        assert moved > 1e-4, (method, moved)  # training moved the weights well beyond the tolerance
        assert _last_loss(tmp_path / f"fsdp-{method}") == pytest.approx(_last_loss(one), rel=1e-5)
