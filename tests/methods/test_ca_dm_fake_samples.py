"""Tests of ``fake_samples="auto"`` in the CA + DM methods (ddmd, cdm): the fake score models what DM acts on.

Rule (``CADMMethod.auto_fake_samples``): with the CA term off (guidance α = 1 or ``ca_weight = 0``) and DM at every
anchor, the fake score is fitted to the anchors' x0-predictions (``anchor``); with CA on (α > 1), or with DM at the
final anchor only, to the student's n_steps samples (``final``). The tests check the resolved value, that the fake
loss is then exactly the one of the explicit setting (same weights, same random stream) and differs from the other,
and that the shipped configs resolve to ``final`` on their guided ring8 teacher and to ``anchor`` in a bench cell.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _fixtures import class_batch, ring_teacher
from _fixtures import student_net as _student_net
from fewstep.benchmarks.leaderboard.cell_setup import Budget, cell_config
from fewstep.config.build import build_method
from fewstep.config.schema import load_config
from fewstep.methods import get_method
from fewstep.methods._shared.split_fake import SplitFake

torch.set_num_threads(1)


def make(name: str, **kw: object) -> nn.Module:
    cls = get_method(name)
    torch.manual_seed(123)  # identical student and fake weights for every configuration
    return cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(**kw))


def fake_loss(m: nn.Module, seed: int = 5) -> Tensor:
    b = class_batch(64, seed=3)
    torch.manual_seed(seed)
    return m.fake_loss(b)[0].detach()


@pytest.mark.parametrize("name", ["ddmd", "cdm"])
@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (dict(guidance=1.0), "anchor"),
        (dict(guidance=3.0, ca_weight=0.0), "anchor"),
        (dict(guidance=3.0), "final"),
        (dict(guidance=1.5), "final"),
        (dict(guidance=1.0, dm_at="final"), "final"),
    ],
)
def test_auto_rule(name: str, kw: dict, expected: str) -> None:
    """auto -> anchor iff CA is off and DM acts at every anchor; the fake loss equals the explicit setting's."""
    extra = dict(schedule="fixed") if name == "cdm" else {}
    m = make(name, fake_samples="auto", **kw, **extra)
    assert m.fake_samples == expected
    other = "final" if expected == "anchor" else "anchor"
    same = fake_loss(make(name, fake_samples=expected, **kw, **extra))
    torch.testing.assert_close(fake_loss(m), same, atol=0, rtol=0)
    assert abs(float(fake_loss(make(name, fake_samples=other, **kw, **extra)) - same)) > 1e-4


def test_explicit_values_are_kept_and_unknown_rejected() -> None:
    """An explicit anchor/final is used as given whatever the guidance; other values raise."""
    assert make("ddmd", fake_samples="final", guidance=1.0).fake_samples == "final"
    assert make("ddmd", fake_samples="anchor", guidance=3.0).fake_samples == "anchor"
    assert make("dmd2", fake_samples="auto").fake_samples == "anchor"
    with pytest.raises(ValueError, match="fake_samples"):
        make("cdm", fake_samples="automatic")


@pytest.mark.parametrize("name", ["ddmd", "cdm"])
def test_shipped_configs_resolve(name: str) -> None:
    """configs/{ddmd,cdm}.yaml: guided ring8 (w = 3) keeps ``final``; an unguided bench cell gets ``anchor``."""
    small = ["student.hidden=8", "student.depth=1"]
    shipped = build_method(load_config(f"configs/{name}.yaml", small), "cpu")[0]
    assert shipped.config.guidance == 3.0 and shipped.fake_samples == "final"
    assert not isinstance(shipped.fake, SplitFake)  # the guided runs keep one fake score
    cell = cell_config(name, "random:0", 0, Budget(steps=10, batch_size=8, hidden=8, depth=1, n=100))
    bench = build_method(cell, "cpu")[0]
    assert bench.config.guidance == 1.0 and bench.fake_samples == "anchor"
    assert isinstance(bench.fake, SplitFake) and len(bench.fake.copies) == bench.config.n_steps
