r"""Tests added to kill mutants of methods/_shared/pairs.py (tools/mutation.py): the reflow pairs of a probe teacher
:math:`v(x, t, c; w) = k x + w\,\beta(c)` whose Euler endpoint is an explicit loop, the shard seeds
``seed * 1_000_003 + i``, the manifest, the staleness checks with their full messages, resuming, ``take`` and
``ensure_pairs``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fewstep.methods._shared.pairs import (
    FORMAT,
    Pairs,
    PairSolver,
    StalePairsError,
    ensure_pairs,
    generate_pairs,
    load_pairs,
)
from fewstep.sampling.samplers import ODE_METHODS, solve_adaptive
from fewstep.teachers.fingerprint import teacher_fingerprint

torch.set_num_threads(1)
K = 0.7
FP = {"class": "probe", "sha256": "abc", "path": "p"}


class _Probe(nn.Module):
    """v(x, t, c; w) = k x + w beta(c) with beta(c) = 0.3 (c + 1) (c = -1 or no label: 0)."""

    def __init__(self, num_classes: int | None = None, k: float = K, event_shape: tuple[int, ...] | None = (2,)):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([k]))  # 1-d: teacher_fingerprint cannot hash 0-d tensors
        self.num_classes = num_classes
        if event_shape is not None:
            self.event_shape = event_shape

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        beta = 0.0 if cond is None else (0.3 * (cond + 1).to(x.dtype)).reshape(-1, *([1] * (x.dim() - 1)))
        return self.k * x + guidance * beta


def _euler(x1: Tensor, cond: Tensor | None, steps: int, w: float = 1.0) -> Tensor:
    x = x1.clone()
    beta = 0.0 if cond is None else (0.3 * (cond + 1).float())[:, None]
    for _ in range(steps):
        x = x - (K * x + w * beta) / steps
    return x


def _shard(seed: int, i: int, m: int, classes: int | None = None, unc: float = 0.0) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
    x1 = torch.randn((m, 2), generator=gen)
    if classes is None:
        return x1, None
    cond = torch.randint(0, classes, (m,), generator=gen)
    return x1, torch.where(torch.rand(m, generator=gen) < unc, torch.full_like(cond, -1), cond)


def test_pair_solver_checks_and_spec() -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f"unknown pair solver 'mid'; expected one of "
                                                         f"{(*ODE_METHODS, 'adaptive')}") + "$"):
        PairSolver("mid")
    with pytest.raises(ValueError, match="^" + re.escape("pair solver steps must be >= 1, got 0") + "$"):
        PairSolver("euler", 0)
    PairSolver("euler", 1)
    PairSolver("adaptive", 0)
    assert PairSolver() == PairSolver("rk4", 32, 1e-5, 1e-5)
    s = PairSolver("heun", 4.0).spec()  # type: ignore[arg-type]
    assert s == {"method": "heun", "steps": 4} and type(s["steps"]) is int
    a = PairSolver("adaptive", 3, 1, 2).spec()  # type: ignore[arg-type]
    assert a == {"method": "adaptive", "rtol": 1.0, "atol": 2.0}
    assert type(a["rtol"]) is float and type(a["atol"]) is float


def test_take_is_floor_u_n_clamped() -> None:
    p = Pairs(torch.arange(5.0)[:, None], -torch.arange(5.0)[:, None], torch.arange(5) + 10, {})
    assert len(p) == 5
    x1, x0, c = p.take(torch.tensor([0.0, 0.199, 0.2, 0.99, 1.0]))
    assert x1[:, 0].tolist() == [0, 0, 1, 4, 4] and x0[:, 0].tolist() == [0, 0, -1, -4, -4]
    assert c.tolist() == [10, 10, 11, 14, 14]
    assert Pairs(p.x1, p.x0, None, {}).take(torch.tensor([0.5]))[2] is None


def test_euler_pairs_seeds_shards_and_manifest(tmp_path: Path) -> None:
    t = _Probe()
    folder = tmp_path / "a" / "b"
    p = generate_pairs(t, folder, 7, PairSolver("euler", 3), seed=2, shard_size=3, batch_size=2, progress=False,
                       fingerprint=FP)
    x1 = torch.cat([_shard(2, i, m)[0] for i, m in ((0, 3), (1, 3), (2, 1))])
    assert torch.equal(p.x1, x1) and p.cond is None and p.x0.dtype == torch.float32
    torch.testing.assert_close(p.x0, _euler(x1, None, 3), rtol=1e-6, atol=1e-6)
    m = json.loads((folder / "manifest.json").read_text())
    assert m == {"format": FORMAT, "teacher": FP, "solver": {"method": "euler", "steps": 3}, "seed": 2,
                 "guidance": 1.0, "event_shape": [2], "num_classes": None, "uncond_fraction": 0.0, "n": 7,
                 "shard_size": 3, "complete": True,
                 "shards": [{"index": i, "file": f"pairs_{i:05d}.safetensors", "n": n}
                            for i, n in ((0, 3), (1, 3), (2, 1))]}
    assert p.manifest == m
    q = generate_pairs(t, tmp_path / "c", 4, PairSolver("heun", 2), shard_size=8, progress=False)
    assert q.manifest["teacher"] == teacher_fingerprint(t) and q.manifest["seed"] == 0
    x, _ = _shard(0, 0, 4)
    h = 0.5  # heun: x + h/2 (v(x) + v(x + h v(x))) with h = -1/2, twice
    for _ in range(2):
        x = x - h / 2 * (K * x + K * (x - h * K * x))
    torch.testing.assert_close(q.x0, x, rtol=1e-6, atol=1e-6)
    d = generate_pairs(t, tmp_path / "d", 2, shard_size=8, progress=False)
    assert d.manifest["solver"] == {"method": "rk4", "steps": 32}
    torch.testing.assert_close(d.x0, d.x1 * math.exp(-K), rtol=1e-5, atol=1e-6)


def test_conditional_guided_pairs(tmp_path: Path) -> None:
    t = _Probe(num_classes=3)
    p = generate_pairs(t, tmp_path, 40, PairSolver("euler", 4), seed=1, guidance=2.0, uncond_fraction=0.3,
                       shard_size=25, batch_size=40, progress=False, fingerprint=FP)
    parts = [_shard(1, 0, 25, 3, 0.3), _shard(1, 1, 15, 3, 0.3)]
    x1, cond = torch.cat([a for a, _ in parts]), torch.cat([c for _, c in parts])
    assert torch.equal(p.x1, x1) and torch.equal(p.cond, cond) and bool((cond == -1).any())
    torch.testing.assert_close(p.x0, _euler(x1, cond, 4, 2.0), rtol=1e-6, atol=1e-6)
    assert p.manifest["num_classes"] == 3 and p.manifest["uncond_fraction"] == 0.3 and p.manifest["guidance"] == 2.0
    full = generate_pairs(t, tmp_path / "f", 10, PairSolver("euler", 1), uncond_fraction=1.0, progress=False)
    assert bool((full.cond == -1).all())


def test_adaptive_pairs_pass_the_tolerances(tmp_path: Path) -> None:
    t = _Probe()
    p = generate_pairs(t, tmp_path, 6, PairSolver("adaptive", rtol=1e-2, atol=1e-2), progress=False)
    x1, _ = _shard(0, 0, 6)
    ref = solve_adaptive(lambda x, s, cond=None: t.velocity(x, s, cond), x1, 1.0, 0.0, rtol=1e-2, atol=1e-2).x
    torch.testing.assert_close(p.x0, ref.detach(), rtol=0, atol=0)
    tight = solve_adaptive(lambda x, s, cond=None: t.velocity(x, s, cond), x1, 1.0, 0.0, rtol=1e-7, atol=1e-7).x
    assert not torch.equal(ref, tight)
    torch.testing.assert_close(p.x0, x1 * math.exp(-K), rtol=0.05, atol=0.05)


def test_generate_refusals(tmp_path: Path) -> None:
    t = _Probe()
    for n, ss, bs in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError, match="^" + re.escape(f"n, shard_size and batch_size must be >= 1; got {n}, "
                                                             f"{ss}, {bs}") + "$"):
            generate_pairs(t, tmp_path / "r", n, shard_size=ss, batch_size=bs, progress=False)
    for u in (-0.1, 1.1):
        with pytest.raises(ValueError, match="^" + re.escape(f"uncond_fraction must lie in [0, 1]; got {u}") + "$"):
            generate_pairs(t, tmp_path / "r", 1, uncond_fraction=u, progress=False)
    with pytest.raises(ValueError, match="^" + re.escape("event_shape is unknown: the teacher has no event_shape "
                                                         "attribute; pass event_shape=") + "$"):
        generate_pairs(_Probe(event_shape=None), tmp_path / "r", 1, progress=False)
    e = generate_pairs(_Probe(event_shape=None), tmp_path / "e", 1, PairSolver("euler", 1), event_shape=(3,),
                       progress=False, fingerprint=FP)
    assert e.x1.shape == (1, 3) and e.manifest["event_shape"] == [3]
    with pytest.raises(FloatingPointError, match="^" + re.escape("teacher ODE produced non-finite endpoints in "
                                                                 "shard 0") + "$"):
        generate_pairs(_Probe(k=math.inf), tmp_path / "inf", 2, PairSolver("euler", 1), shard_size=1,
                       progress=False, fingerprint=FP)
    generate_pairs(t, tmp_path / "ok", 1, PairSolver("euler", 1), shard_size=1, batch_size=1, progress=False)


def test_stale_messages_and_resume(tmp_path: Path) -> None:
    t = _Probe()
    s = PairSolver("euler", 2)
    generate_pairs(t, tmp_path, 5, s, seed=4, shard_size=2, progress=False, fingerprint=FP)
    other = {**FP, "sha256": "zzz"}
    msg = (f"pairs in {tmp_path} do not match the requested teacher/solver (teacher: cached "
           f"{ {'class': 'probe', 'sha256': 'abc'}!r} vs requested { {'class': 'probe', 'sha256': 'zzz'}!r}; "
           f"solver: cached {s.spec()!r} vs requested {PairSolver('euler', 3).spec()!r}); delete the folder, use "
           "another pair_dir, or pass allow_stale=True to reuse them knowingly")
    with pytest.raises(StalePairsError, match="^" + re.escape(msg) + "$"):
        load_pairs(tmp_path, fingerprint=other, solver=PairSolver("euler", 3))
    with pytest.raises(StalePairsError, match="^" + re.escape(msg) + "$"):
        generate_pairs(t, tmp_path, 5, PairSolver("euler", 3), seed=4, shard_size=2, progress=False,
                       fingerprint=other)
    assert len(load_pairs(tmp_path, fingerprint={**FP, "path": "elsewhere"}, solver=s, seed=4)) == 5
    with pytest.raises(StalePairsError, match=re.escape("seed: cached 4 vs requested 5")):
        load_pairs(tmp_path, seed=5)
    with pytest.raises(StalePairsError, match="^" + re.escape(f"pairs in {tmp_path} use shard_size 2, requested 3")
                       + "$"):
        generate_pairs(t, tmp_path, 5, s, seed=4, shard_size=3, progress=False, fingerprint=FP)
    with pytest.raises(StalePairsError, match="^" + re.escape(f"{tmp_path} holds 5 pairs, 6 requested") + "$"):
        load_pairs(tmp_path, n=6)
    three = load_pairs(tmp_path, n=3)
    assert len(three) == 3 and three.cond is None
    full = load_pairs(tmp_path)
    assert torch.equal(three.x1, full.x1[:3]) and torch.equal(three.x0, full.x0[:3])
    # resume: a missing shard file is regenerated; a shorter n regenerates the now-partial last shard
    (tmp_path / "pairs_00001.safetensors").unlink()
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StalePairsError, match="^" + re.escape(f"pair generation in {tmp_path} is incomplete; "
                                                              "resume it with generate_pairs") + "$"):
        load_pairs(tmp_path)
    r = ensure_pairs(t, tmp_path, 5, s, seed=4, shard_size=2, progress=False, fingerprint=FP)
    assert torch.equal(r.x1, full.x1) and torch.equal(r.x0, full.x0)
    short = generate_pairs(t, tmp_path, 3, s, seed=4, shard_size=2, progress=False, fingerprint=FP)
    x1 = torch.cat([_shard(4, 0, 2)[0], _shard(4, 1, 1)[0]])
    assert torch.equal(short.x1, x1) and [d["n"] for d in short.manifest["shards"]] == [2, 1]
    assert short.manifest["n"] == 3
    torch.testing.assert_close(short.x0, _euler(x1, None, 2), rtol=1e-6, atol=1e-6)


def test_load_refusals(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"no reflow pairs in {tmp_path} (manifest.json "
                                                                "missing)") + "$"):
        load_pairs(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "old"}))
    with pytest.raises(StalePairsError, match="^" + re.escape(f"{tmp_path / 'manifest.json'} has format 'old', "
                                                              f"expected {FORMAT!r}") + "$"):
        load_pairs(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "complete": True, "shards": []}))
    with pytest.raises(StalePairsError, match="^" + re.escape(f"{tmp_path} holds no pair shards") + "$"):
        load_pairs(tmp_path)


def test_ensure_pairs_loads_or_generates(tmp_path: Path) -> None:
    t = _Probe(num_classes=2)
    s = PairSolver("euler", 2)
    a = ensure_pairs(t, tmp_path, 6, s, seed=3, guidance=1.5, shard_size=4, progress=False)
    assert a.manifest["seed"] == 3 and a.manifest["guidance"] == 1.5
    # complete and large enough: loaded (a prefix), checked against the teacher's fingerprint, seed and guidance
    b = ensure_pairs(t, tmp_path, 5, s, seed=3, guidance=1.5, shard_size=4, progress=False)
    assert len(b) == 5 and torch.equal(b.x1, a.x1[:5]) and torch.equal(b.cond, a.cond[:5])
    for kw in (dict(seed=4, guidance=1.5), dict(seed=3, guidance=1.0)):
        with pytest.raises(StalePairsError):
            ensure_pairs(t, tmp_path, 5, s, shard_size=4, progress=False, **kw)
    with pytest.raises(StalePairsError, match="solver"):
        ensure_pairs(t, tmp_path, 5, seed=3, guidance=1.5, shard_size=4, progress=False)
    with pytest.raises(StalePairsError, match="teacher"):
        ensure_pairs(_Probe(num_classes=2, k=0.5), tmp_path, 5, s, seed=3, guidance=1.5, progress=False)
    assert len(ensure_pairs(_Probe(num_classes=2, k=0.5), tmp_path, 5, s, seed=3, guidance=1.5,
                            allow_stale=True, progress=False)) == 5
    assert len(ensure_pairs(t, tmp_path, 5, s, seed=3, guidance=1.5, fingerprint=teacher_fingerprint(t))) == 5
    c = ensure_pairs(t, tmp_path, 8, s, seed=3, guidance=1.5, shard_size=4, progress=False)  # more: generated
    assert len(c) == 8 and torch.equal(c.x1[:6], a.x1) and c.manifest["n"] == 8
