"""Reflow pairs: exact endpoints, disk round-trip, resumable generation, stale pairs rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.core.flowmap import FlowMap
from fewstep.methods._shared.pairs import (
    PairSolver,
    StalePairsError,
    ensure_pairs,
    generate_pairs,
    load_pairs,
)
from fewstep.networks.mlp import MLP
from fewstep.sampling.samplers import solve_adaptive
from fewstep.teachers.fingerprint import teacher_fingerprint
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ring8():
    return load_preset("ring8")


def test_pairs_are_teacher_ode_endpoints_and_round_trip(ring8, tmp_path: Path) -> None:
    solver = PairSolver("rk4", 32)
    p = generate_pairs(ring8, tmp_path / "p", 300, solver, seed=3, shard_size=128, progress=False)
    assert len(p) == 300 and p.x1.shape == (300, 2) and p.cond is None
    ref = solve_adaptive(ring8, p.x1[:50].double(), rtol=1e-8, atol=1e-8).x
    assert torch.allclose(p.x0[:50].double(), ref, atol=2e-3)
    files = sorted(f.name for f in (tmp_path / "p").glob("*.safetensors"))
    assert files == ["pairs_00000.safetensors", "pairs_00001.safetensors", "pairs_00002.safetensors"]
    q = load_pairs(tmp_path / "p", teacher=ring8, solver=solver)
    assert torch.equal(q.x1, p.x1) and torch.equal(q.x0, p.x0)
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["solver"] == {"method": "rk4", "steps": 32} and m["seed"] == 3 and m["complete"]


def test_stale_pairs_are_rejected(ring8, tmp_path: Path) -> None:
    generate_pairs(ring8, tmp_path, 64, PairSolver("euler", 8), progress=False)
    with pytest.raises(StalePairsError, match="solver"):
        load_pairs(tmp_path, teacher=ring8, solver=PairSolver("euler", 16))
    with pytest.raises(StalePairsError, match="teacher"):
        load_pairs(tmp_path, teacher=load_preset("aniso3"), solver=PairSolver("euler", 8))
    with pytest.raises(StalePairsError):
        ensure_pairs(load_preset("aniso3"), tmp_path, 64, PairSolver("euler", 8), progress=False)
    # explicit override loads them
    assert len(load_pairs(tmp_path, teacher=load_preset("aniso3"), allow_stale=True)) == 64


def test_generation_resumes_shard_by_shard(ring8, tmp_path: Path) -> None:
    solver = PairSolver("heun", 4)
    full = generate_pairs(ring8, tmp_path / "a", 200, solver, seed=1, shard_size=64, progress=False)
    part = tmp_path / "b"
    generate_pairs(ring8, part, 200, solver, seed=1, shard_size=64, progress=False)
    # simulate an interruption: drop the last two shards and mark incomplete
    m = json.loads((part / "manifest.json").read_text())
    for s in m["shards"][2:]:
        (part / s["file"]).unlink()
    m["shards"], m["complete"] = m["shards"][:2], False
    (part / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StalePairsError, match="incomplete"):
        load_pairs(part, teacher=ring8, solver=solver)
    resumed = ensure_pairs(ring8, part, 200, solver, seed=1, shard_size=64, progress=False)
    assert torch.equal(resumed.x1, full.x1) and torch.equal(resumed.x0, full.x0)


def test_conditional_guided_pairs_and_module_fingerprint(tmp_path: Path) -> None:
    t = load_preset("ring8", conditional=True)
    p = generate_pairs(t, tmp_path, 64, PairSolver("rk4", 16), guidance=2.0, uncond_fraction=0.25,
                       progress=False)
    assert p.cond is not None and p.cond.min() >= -1 and p.cond.max() < 4
    guided = solve_adaptive(t, p.x1.double(), rtol=1e-8, atol=1e-8, cond=p.cond, guidance=2.0).x
    assert torch.allclose(p.x0.double(), guided, atol=5e-3)
    net = FlowMap(MLP(2, 16, 1, use_s=False), "velocity")
    f1 = teacher_fingerprint(net)
    with torch.no_grad():
        net.net.net[0].weight[0, 0] += 1e-3
    assert teacher_fingerprint(net)["sha256"] != f1["sha256"]
    with pytest.raises(ValueError, match="pair solver"):
        PairSolver("midpoint", 4)


def test_fingerprint_of_a_teacher_with_a_scalar_parameter() -> None:
    """A 0-d tensor (a scalar nn.Parameter) is hashed by its bytes, and changing it changes the fingerprint."""
    net = torch.nn.Module()
    net.scale = torch.nn.Parameter(torch.tensor(0.5))
    f1 = teacher_fingerprint(net)["sha256"]
    with torch.no_grad():
        net.scale += 1e-3
    assert teacher_fingerprint(net)["sha256"] != f1
