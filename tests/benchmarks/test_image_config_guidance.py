"""Every shipped image config distils the *unguided* teacher (effective CFG weight 1).

The image benchmark (docs/results/images_all_methods.md) scores students against unguided real digits and the
teacher's unguided Euler bars, so a config whose method falls back to a guided default (ddmd and cdm default to
alpha = 3) trains towards another distribution: at alpha = 3 their CA term blew the 1-NFE samples up to FD ~8e4.
The effective weight is ``teacher.guidance`` when it is not 1, else the method config's ``guidance`` (its default
when the YAML does not set it), the rule of ``fewstep.config.build.build_method``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.config.schema import load_config
from fewstep.methods.registry import get_method

CONFIGS = sorted(Path("configs/images").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_image_config_is_unguided(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.teacher.guidance == 1.0, f"{path}: teacher.guidance={cfg.teacher.guidance}"
    method_cfg = get_method(cfg.method.name).make_config(**dict(cfg.method.cfg))
    assert getattr(method_cfg, "guidance", 1.0) == 1.0, (
        f"{path}: method {cfg.method.name!r} resolves to guidance {method_cfg.guidance}; the benchmark is unguided"
    )
