"""Peers (fewstep.benchmarks.peers): convention adapters and a smoke run; needs the peers extra (marker ``peers``)."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.peers
if importlib.util.find_spec("torchcfm") is None or importlib.util.find_spec("rectified_flow_pytorch") is None:
    pytest.skip("the peers extra is not installed (pip install 'fewstep[peers]')", allow_module_level=True)

from fewstep.benchmarks.peer_adapters import (  # noqa: E402
    MeanFlowAdapter,
    TeacherAdapter,
    VelocityAdapter,
    load_rectified_flow_pytorch,
)
from fewstep.benchmarks.peers import run, train_peer  # noqa: E402
from fewstep.evaluation.evaluate import teacher_endpoint  # noqa: E402
from fewstep.networks.mlp import MLP  # noqa: E402
from fewstep.teachers.presets import load_preset  # noqa: E402

torch.set_num_threads(1)


def test_peer_ode_on_the_teacher_adapter_reaches_the_teacher_endpoint() -> None:
    """rectified-flow-pytorch's own sampler on the adapted exact teacher lands where fewstep's teacher ODE does."""
    rfp = load_rectified_flow_pytorch()
    teacher = load_preset("ring8")
    x1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flow = rfp.RectifiedFlow(TeacherAdapter(teacher), data_shape=(2,), data_normalize_fn=None, data_unnormalize_fn=None)
    x0 = flow.sample(noise=x1.float(), steps=32).double()
    ref, _ = teacher_endpoint(teacher, x1)
    assert (x0 - ref).norm(dim=1).median() < 0.02


def test_adapters_map_the_time_conventions() -> None:
    """Peer time tau = 1 - t with velocity -F(x, 1 - tau); the peer MeanFlow's u(x, t, delta) = F(x, t, t - delta)."""
    torch.manual_seed(0)
    x, tau = torch.randn(6, 2), torch.rand(6)
    vnet = MLP(2, hidden=16, depth=2, use_s=False)
    torch.testing.assert_close(VelocityAdapter(vnet)(x, tau), -vnet(x, 1 - tau, 1 - tau))
    mnet = MLP(2, hidden=16, depth=2, use_s=True)
    t, delta = torch.rand(6), 0.3 * torch.rand(6)
    torch.testing.assert_close(MeanFlowAdapter(mnet)(x, t, delta), mnet(x, t, t - delta))


@pytest.mark.parametrize("name", ["rfp_reflow", "rfp_meanflow", "cfm_otcfm"])
def test_each_peer_trains_end_to_end(name: str) -> None:
    """A few steps of each peer run end to end and give a finite flow-map student."""
    teacher = load_preset("ring8")
    student, wall = train_peer(name, teacher, steps=4, batch=64, seed=0, hidden=32, depth=2)
    out = student(torch.randn(16, 2), 1.0, 0.0)
    assert out.shape == (16, 2) and torch.isfinite(out).all() and wall > 0


def test_run_writes_the_table(tmp_path) -> None:  # noqa: ANN001
    args = argparse.Namespace(
        methods=["cfm_otcfm", "flow_matching"],
        preset="ring8",
        seeds=[0],
        steps=3,
        batch_size=32,
        hidden=16,
        depth=2,
        n=64,
        threads=1,
        out=str(tmp_path / "p.md"),
        argv=["--steps", "3"],
    )
    res = run(args)
    assert {r["method"] for r in res["runs"]} == {"cfm_otcfm", "flow_matching"}
    text = (tmp_path / "p.md").read_text()
    assert "| cfm_otcfm |" in text and "python -m fewstep.benchmarks.peers --steps 3" in text
