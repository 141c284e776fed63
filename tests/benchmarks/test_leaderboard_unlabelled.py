"""Every bench cell trains on unlabelled rows: its samples are drawn unconditionally (no label), so a student that
had seen labels would be sampled through an untrained null-label embedding (the digits preset keeps its 10
classes even with ``teacher.conditional=false``)."""

from __future__ import annotations

import pytest

from fewstep.benchmarks.leaderboard.cell_setup import Budget, cell_config
from fewstep.config.build import build_dataset, build_teacher


@pytest.mark.parametrize("target", ["digits", "ring8", "random:3"])
def test_cell_data_has_no_labels(target: str) -> None:
    cfg = cell_config("flow_matching", target, 0, Budget())
    teacher = build_teacher(cfg.teacher)
    ds = build_dataset(cfg.data.name, dict(cfg.data.kwargs), teacher)
    assert ds.num_classes is None
    x0, labels = ds.sample(8)
    assert x0.shape[0] == 8 and labels is None
