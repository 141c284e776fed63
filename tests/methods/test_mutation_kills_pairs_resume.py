r"""More kill tests of methods/_shared/pairs.py (tools/mutation.py): the manifest on disk during and after an
interrupted generation, which shards a resume regenerates (teacher calls counted), the adaptive solve per teacher
batch (dopri5's step sizes depend on the batch, so batch boundaries are visible), the default shard and batch
sizes, the progress bar, and ``ensure_pairs``' load-or-generate decision and defaults.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fewstep.methods._shared.pairs import PairSolver, StalePairsError, ensure_pairs, generate_pairs, load_pairs
from fewstep.sampling.samplers import solve_adaptive

torch.set_num_threads(1)
K = 0.7
FP = {"class": "probe", "sha256": "abc", "path": ""}
EULER1 = PairSolver("euler", 1)


class _Counting(nn.Module):
    """v(x, t, c; w) = k x + w 0.3 (c + 1); counts its calls and returns NaN after ``ok_calls`` calls."""

    event_shape = (2,)

    def __init__(self, num_classes: int | None = None, ok_calls: int = 10 ** 9) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor([K]))
        self.num_classes, self.ok_calls, self.calls = num_classes, ok_calls, 0

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        self.calls += 1
        beta = 0.0 if cond is None else (0.3 * (cond + 1).to(x.dtype))[:, None]
        v = self.k * x + guidance * beta
        return v if self.calls <= self.ok_calls else v * float("nan")


class _NoClasses(nn.Module):
    """A teacher-like object without a ``num_classes`` attribute: v = -x."""

    event_shape = (2,)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return -x


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_interrupted_generation_and_resume(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match="^" + re.escape("teacher ODE produced non-finite endpoints in "
                                                                 "shard 1") + "$"):
        generate_pairs(_Counting(ok_calls=1), tmp_path, 3, EULER1, shard_size=1, progress=False, fingerprint=FP)
    m = _manifest(tmp_path)
    assert m["complete"] is False and m["n"] == 3
    assert m["shards"] == [{"index": 0, "file": "pairs_00000.safetensors", "n": 1}]
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(m, indent=1, sort_keys=True)  # stable bytes: sorted keys, indent 1
    with pytest.raises(StalePairsError, match="incomplete"):
        load_pairs(tmp_path)
    good = _Counting()
    p = generate_pairs(good, tmp_path, 3, EULER1, shard_size=1, progress=False, fingerprint=FP)
    assert good.calls == 2 and len(p) == 3  # only shards 1 and 2 were solved
    m = _manifest(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == json.dumps(m, indent=1, sort_keys=True)
    del m["shards"]  # a manifest without a shard list: every shard is solved again
    m["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    again = _Counting()
    q = generate_pairs(again, tmp_path, 3, EULER1, shard_size=1, progress=False, fingerprint=FP)
    assert again.calls == 3 and torch.equal(q.x0, p.x0)


def test_teacher_without_num_classes(tmp_path: Path) -> None:
    p = generate_pairs(_NoClasses(), tmp_path, 3, EULER1, progress=False, fingerprint=FP)
    assert p.cond is None and p.manifest["num_classes"] is None
    torch.testing.assert_close(p.x0, 2 * p.x1, rtol=0, atol=0)  # one Euler step 1 -> 0: x1 + (-1)(-x1)


def _adaptive_ref(t: nn.Module, x1: Tensor, cond: Tensor | None, cuts: list[int], tol: float) -> Tensor:
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        c = None if cond is None else cond[a:b]
        parts.append(solve_adaptive(lambda x, s, cond=None: t.velocity(x, s, cond), x1[a:b], 1.0, 0.0, rtol=tol,
                                    atol=tol, cond=c).x)
    return torch.cat(parts).detach()


def test_adaptive_pairs_are_solved_per_teacher_batch_with_labels(tmp_path: Path) -> None:
    t = _Counting(num_classes=3)
    s = PairSolver("adaptive", rtol=1e-2, atol=1e-2)
    p = generate_pairs(t, tmp_path, 5, s, shard_size=5, batch_size=2, progress=False, fingerprint=FP)
    assert p.cond is not None
    ref = _adaptive_ref(t, p.x1, p.cond, [0, 2, 4, 5], 1e-2)
    torch.testing.assert_close(p.x0, ref, rtol=0, atol=0)
    assert not torch.equal(ref, _adaptive_ref(t, p.x1, p.cond, [0, 5], 1e-2))  # the batches are visible
    assert not torch.equal(ref, _adaptive_ref(t, p.x1, None, [0, 2, 4, 5], 1e-2))  # and the labels


def test_default_shard_and_batch_sizes(tmp_path: Path) -> None:
    t = _Counting()
    s = PairSolver("adaptive", rtol=1e-2, atol=1e-2)
    p = generate_pairs(t, tmp_path / "a", 4097, s, progress=False, fingerprint=FP)
    assert [d["n"] for d in p.manifest["shards"]] == [4096, 1] and p.manifest["shard_size"] == 4096
    q = generate_pairs(t, tmp_path / "b", 4097, s, shard_size=4097, progress=False, fingerprint=FP)
    ref = _adaptive_ref(t, q.x1, None, [0, 4096, 4097], 1e-2)
    torch.testing.assert_close(q.x0, ref, rtol=0, atol=0)
    assert not torch.equal(ref, _adaptive_ref(t, q.x1, None, [0, 4097], 1e-2))


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = _Counting()
    generate_pairs(t, tmp_path, 6, EULER1, shard_size=3, fingerprint=FP)  # progress is on by default
    err = capsys.readouterr().err
    assert "reflow pairs: 100%" in err and "6/6 [" in err and re.search(r"[\d.]+(pair/s|s/pair)\]", err)
    generate_pairs(t, tmp_path, 3, EULER1, shard_size=3, fingerprint=FP)  # resumed: the 3 rows of shard 0 counted
    err = capsys.readouterr().err
    assert "3/3 [" in err and "6/3" not in err
    generate_pairs(t, tmp_path / "q", 2, EULER1, shard_size=2, fingerprint=FP, progress=False)
    assert capsys.readouterr().err == ""


def test_ensure_pairs_decision_and_defaults(tmp_path: Path) -> None:
    t = _Counting()
    d = ensure_pairs(t, tmp_path / "d", 2, EULER1, shard_size=2, fingerprint=FP, progress=False)
    g = torch.Generator().manual_seed(0)
    assert d.manifest["seed"] == 0 and torch.equal(d.x1, torch.randn((2, 2), generator=g))
    # complete with exactly n rows: loaded (a generation with the default shard_size would refuse), checked
    # against the given fingerprint and the default guidance 1
    e = ensure_pairs(t, tmp_path / "d", 2, EULER1, fingerprint=FP)
    assert torch.equal(e.x0, d.x0)
    # a complete manifest without n: generated again (and n written back)
    m = _manifest(tmp_path / "d")
    del m["n"]
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    ensure_pairs(t, tmp_path / "d", 1, EULER1, shard_size=2, fingerprint=FP, progress=False)
    assert _manifest(tmp_path / "d")["n"] == 1
    # an incomplete folder of another teacher is resumed when allow_stale is passed on
    m = _manifest(tmp_path / "d")
    m["complete"] = False
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    other = {**FP, "sha256": "zzz"}
    with pytest.raises(StalePairsError):
        ensure_pairs(t, tmp_path / "d", 2, EULER1, shard_size=2, fingerprint=other, progress=False)
    r = ensure_pairs(t, tmp_path / "d", 2, EULER1, shard_size=2, fingerprint=other, allow_stale=True,
                     progress=False)
    assert len(r) == 2 and r.manifest["teacher"] == other
