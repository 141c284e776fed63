"""FSDP2 (train.fsdp): 2-process torchrun training with a sharded student equals 1-process training, and its
checkpoints hold full tensors that load in one process and resume under FSDP."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from _trainer_helpers import fm_method, make_trainer, tiny_student, torchrun
from fewstep.config.schema import TrainConfig
from fewstep.methods.base import Method
from fewstep.methods.registry import get_method
from fewstep.training.checkpoint import load_checkpoint, method_tensors

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parents[1]
KW = dict(steps=8, batch_size=32, grad_accum=2, ckpt_every=4, ema_decays=[0.9])

SCRIPT = textwrap.dedent("""
    import json, shutil, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import fewstep.training.distributed as D
    from fewstep.training.fsdp import is_sharded
    sys.path.insert(0, {here!r})
    from test_fsdp import KW, build

    rank, world, device = D.init_distributed("cpu")
    out = sys.argv[1]
    info = {{}}
    for name in ("flow_matching", "meanflow"):
        tr = build(name, run_dir=f"{{out}}/{{name}}", fsdp=True, **KW)
        tr.fit()
        sharded = all(is_sharded(p) for p in tr.method.student.parameters())
        # resume from ckpt-4 under FSDP: the full tensors are cut back into shards
        if rank == 0:
            shutil.copytree(f"{{out}}/{{name}}/ckpt-4", f"{{out}}/{{name}}-resume/ckpt-4")
        D.barrier()
        re = build(name, run_dir=f"{{out}}/{{name}}-resume", fsdp=True, resume=True, **KW)
        re.fit()
        info[name] = {{"sharded": sharded, "loss": tr.history[-1]["student/loss"]}}
    if rank == 0:
        json.dump(info, open(out + "/info.json", "w"))
    D.cleanup()
""")


def build(name: str, run_dir: str | None = None, resume: bool = False, **kw: object):  # noqa: ANN201
    """A quiet trainer of ``name`` (flow_matching or meanflow) on a tiny seeded student."""
    if name == "flow_matching":
        method: Method = fm_method(seed=0)
    else:
        cls = get_method(name)
        method = cls(tiny_student("average_velocity", seed=0), None, cls.make_config())
    tr = make_trainer(method, run_dir=Path(run_dir) if run_dir else None, **kw)
    tr.resume = resume
    return tr


def test_fsdp_needs_ema_and_is_a_noop_in_one_process() -> None:
    with pytest.raises(ValueError, match="train.fsdp=true needs train.ema_decays"):
        TrainConfig(fsdp=True, ema_decays=[])
    with pytest.warns(UserWarning, match="single process: training unsharded"):
        tr = build("flow_matching", fsdp=True, steps=2)
    tr.fit()
    assert not tr.fsdp


@pytest.mark.slow
def test_torchrun_fsdp_equals_one_process(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_script.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), here=str(Path(__file__).parent)))
    res = torchrun([str(script), str(tmp_path)], timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert res.stderr.decode().count("-resume/ckpt-4") == 2  # rank 0 resumed each method from ckpt-4
    for name in ("flow_matching", "meanflow"):
        assert info[name]["sharded"]
        single = build(name, **KW)
        single.fit()
        ref = {"method/" + k: v for k, v in single.method.state_dict().items()}
        ref.update({"ema/0.9/" + k: v for k, v in single.student(ema=True).state_dict().items()})
        for run in (name, f"{name}-resume"):
            tensors, state = load_checkpoint(tmp_path / run / "ckpt-8")  # full tensors, loadable in one process
            got = {k: v for k, v in tensors.items() if k.startswith(("method/", "ema/"))}
            assert set(got) == set(ref), (run, sorted(set(got) ^ set(ref)))
            worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
            assert worst < 1e-5, (run, worst)
            assert state["step"] == 8
        single.method.load_state_dict(method_tensors(load_checkpoint(tmp_path / name / "ckpt-8")[0]))
        assert info[name]["loss"] == pytest.approx(single.history[-1]["student/loss"], rel=1e-5)
