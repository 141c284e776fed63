"""Run folders stay readable: keys retired from the schema are ignored in a stored config.yaml (not an error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fewstep.config.build import resolve_sampler
from fewstep.config.run_folder import RETIRED_KEYS, read_run_config
from fewstep.config.schema import RunConfig, to_dict


def test_retired_keys_in_a_run_folder_are_ignored(tmp_path: Path) -> None:
    data = to_dict(RunConfig())
    data["train"]["num_workers"] = 0  # written by fewstep before the key was removed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert ("train", "num_workers") in RETIRED_KEYS
    assert read_run_config(tmp_path).train.steps == RunConfig().train.steps


def test_resolve_sampler_order(tmp_path: Path) -> None:
    cfg = RunConfig()
    cfg.method.name = "cd"
    assert resolve_sampler(cfg).gamma == 1.0  # the method's own
    cfg.sampler.gamma = 0.25
    assert resolve_sampler(cfg).gamma == 0.25  # the config's
    assert resolve_sampler(cfg, gamma=0.0, grid="edm").to_dict() == {"gamma": 0.0, "grid": "edm"}  # explicit
    with pytest.raises(ValueError, match="sampler grid must be one of"):
        resolve_sampler(cfg, grid="cosine")


def test_renamed_method_key_in_a_run_folder_is_read_under_its_new_name(tmp_path: Path) -> None:
    data = to_dict(RunConfig())
    data["method"] = {"name": "meanflow", "cfg": {"teacher_guidance": 2.0}}  # the name before `guidance`
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert read_run_config(tmp_path).method.cfg == {"guidance": 2.0}
