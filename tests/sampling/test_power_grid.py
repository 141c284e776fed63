"""The ``power:<p>`` sampler grid t_i = (1 - i/K)^p: values, validation (spec, config, CLI), the sampler using it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.cli_eval import run_sampler
from fewstep.config.build import resolve_sampler
from fewstep.config.schema import SamplerConfig, load_config
from fewstep.sampling.samplers import time_grid
from fewstep.sampling.spec import SamplerSpec, check_grid_rule, grid_times, is_grid_rule, sample_with

DT = torch.float64


def test_power_two_puts_the_two_step_intermediate_time_at_a_quarter() -> None:
    assert grid_times("power:2", 2).tolist() == [1.0, 0.25, 0.0]
    assert grid_times("power:2", 4).tolist() == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    torch.testing.assert_close(grid_times("power:3", 3), torch.tensor([1.0, 8 / 27, 1 / 27, 0.0], dtype=DT))
    for k in range(1, 6):
        torch.testing.assert_close(grid_times("power:1", k), time_grid(k))  # p = 1 is the uniform grid
        g = grid_times("power:0.5", k)
        assert g[0] == 1.0 and g[-1] == 0.0 and bool((g[1:] < g[:-1]).all())
    assert grid_times("uniform", 2).tolist() == [1.0, 0.5, 0.0]
    torch.testing.assert_close(grid_times("edm", 3), time_grid(3, kind="edm"))
    spec = SamplerSpec(grid="power:2")
    assert spec.times(2).tolist() == [1.0, 0.25, 0.0] and spec.times(1).tolist() == [1.0, 0.0]
    assert spec.describe() == "gamma=0 (deterministic jumps), power:2 grid"


def test_sample_with_jumps_on_the_power_grid() -> None:
    """Deterministic and gamma = 1 sampling query the flow map at the rule's times."""
    for gamma in (0.0, 1.0):
        calls: list[tuple[float, float]] = []

        def fm(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: object = None) -> torch.Tensor:
            calls.append((float(t.flatten()[0]), float(s.flatten()[0])))  # noqa: B023
            return x

        sample_with(fm, torch.zeros(3, 2), SamplerSpec(gamma=gamma, grid="power:2"), nfe=2)
        froms = [c[0] for c in calls]
        assert froms == pytest.approx([1.0, 0.25]), (gamma, calls)


@pytest.mark.parametrize("rule", ["power", "power:", "power:0", "power:-1", "power:nan", "power:inf", "power:x"])
def test_a_power_rule_without_a_positive_exponent_is_named(rule: str) -> None:
    msg = rf"^sampler grid must be 'power:<p>' with a finite exponent p > 0, e.g\. 'power:2' .*; got '{rule}'$"
    with pytest.raises(ValueError, match=msg):
        SamplerSpec(grid=rule)
    with pytest.raises(ValueError, match=rf"^invalid value for config key 'sampler.grid': '{rule}'; "
                                         r"must be 'power:<p>' with a finite exponent p > 0, e\.g\. 'power:2' "
                                         r"\(t_i = \(1 - i/K\)\^p\)$"):
        SamplerConfig(grid=rule)


@pytest.mark.parametrize("rule", ["cosine", "edm:7", "uniform:2", "", 2])
def test_unknown_rules_are_named(rule: object) -> None:
    with pytest.raises(ValueError, match=r"^sampler grid must be one of 'uniform', 'edm', 'power:<p>' .*; got "):
        SamplerSpec(grid=rule)  # type: ignore[arg-type]
    assert check_grid_rule("power:2.5") == "power:2.5"
    with pytest.raises(ValueError, match=r"^invalid value for config key 'sampler.grid': 'cosine'; must be one of "
                                         r"'uniform', 'edm', 'power:<p>' \(p > 0: t_i = \(1 - i/K\)\^p\)$"):
        SamplerConfig(grid="cosine")


def test_config_section_resolves_and_round_trips(tmp_path: object) -> None:
    cfg = load_config(None, ["method.name=imm", "sampler.grid=power:2"])
    spec = resolve_sampler(cfg)
    assert spec.grid == "power:2" and spec.gamma == 0.0 and spec.times(2).tolist() == [1.0, 0.25, 0.0]
    assert resolve_sampler(cfg, grid="uniform").grid == "uniform"  # an explicit --grid still wins
    with pytest.raises(ValueError, match=r"^invalid value for config key 'sampler.grid': 'power:-2'; must be 'power"):
        load_config(None, ["sampler.grid=power:-2"])


def test_cli_grid_option_accepts_a_power_rule() -> None:
    run = SimpleNamespace(config=load_config(None, ["method.name=imm"]), sampler=SamplerSpec())
    spec, times = run_sampler(run, None, "power:2")
    assert spec.grid == "power:2" and times is None
    assert run_sampler(run, None, "1,0.25,0")[1] == [1.0, 0.25, 0.0]
    assert is_grid_rule("power:2") and not is_grid_rule("1,0.5,0")
    with pytest.raises(ValueError, match=r"^--grid must be 'power:<p>' with a finite exponent"):
        run_sampler(run, None, "power:0")
