"""fewstep.benchmarks.dm_targets: the three CFG targets, their separation, the verdict rule and eval --target."""

from __future__ import annotations

import shlex

import pytest
import torch

from fewstep.benchmarks.dm_targets import VARIANTS, separation, target_samples
from fewstep.benchmarks.dm_targets_eval import eval_target, run_guidance
from fewstep.benchmarks.dm_targets_report import (
    ablation_table,
    as_parts,
    ci95,
    clean_command,
    merge,
    nearest_target,
    students_table,
)
from fewstep.cli import build_parser
from fewstep.config.schema import load_config
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shared3() -> object:
    return load_preset("shared3", conditional=True)


def test_targets_coincide_at_w1_and_separate_at_w4(shared3: object) -> None:
    """At w = 1 guided ODE, tilted density and mixture are one distribution; at w = 4 every pair is far apart."""
    one = separation(target_samples(shared3, 1.0, 600, 0, cell=0.02))
    assert max(abs(v) for v in one.values()) < 0.01
    four = separation(target_samples(shared3, 4.0, 600, 0, cell=0.02))
    pairs = [v for k, v in four.items() if " vs " in k]
    floors = [v for k, v in four.items() if k.startswith("floor")]
    assert min(pairs) > 0.05 and max(abs(f) for f in floors) < 0.01


def test_ci95_and_nearest_target_verdict() -> None:
    m, h = ci95([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and h == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    clear = [{"guided_ode": 0.30 + e, "tilted": 0.05 + e, "mixture": 0.10 + e} for e in (0.0, 0.01, -0.01)]
    assert nearest_target(clear) == "tilted" and nearest_target(clear, gap=0.2) == "tilted"
    assert nearest_target(clear, gap=0.04).startswith("at none")  # farther from all than the targets are apart
    close = [{"guided_ode": 0.3, "tilted": 0.05 + e, "mixture": 0.05 - e} for e in (0.01, -0.02, 0.005)]
    assert nearest_target(close).startswith("tie ")


def test_eval_target_scores_exact_samples_at_the_floor(shared3: object) -> None:
    """A 'student' returning exact tilted samples is at the tilted floor and far from the other targets."""
    w, n = 4.0, 500
    ref = target_samples(shared3, w, n, 7, cell=0.02)

    def sample(k: int, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        torch.testing.assert_close(cond, ref["cond"])  # the student gets the targets' labels
        from fewstep.benchmarks.guided_targets import sample_tilted

        return sample_tilted(shared3, cond, w, box=4.5, cell=0.02, generator=torch.Generator().manual_seed(k))

    res = eval_target(None, shared3, "tilted", w, [1], n, 7, sample)
    row = res["student"][1]
    assert abs(row["mmd2"]) < 0.01 and row["mmd2"] == row["mmd2_tilted"]
    assert row["mmd2_guided_ode"] > 0.05 and row["mmd2_mixture"] > 0.05
    assert "mmd2_sd" in res["floor_exact_vs_exact"] and res["teacher_adaptive"]["mmd2_guided_ode"] < 0.01


def test_eval_target_rejects_bad_input(shared3: object) -> None:
    with pytest.raises(ValueError, match="--target must be one of"):
        eval_target(None, shared3, "guided", 2.0, [1], 500, 0, lambda *a: None)
    with pytest.raises(ValueError, match="class-conditional 2-D"):
        eval_target(None, load_preset("shared3"), "tilted", 2.0, [1], 500, 0, lambda *a: None)


def test_cli_eval_target_flags_and_run_guidance() -> None:
    args = build_parser().parse_args(["eval", "RUN", "--target", "tilted", "--w", "2"])
    assert args.target == "tilted" and args.w == 2.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "RUN", "--target", "guided"])
    cfg = load_config("configs/cdm.yaml", ["teacher.name=shared3", "teacher.guidance=4"])
    assert run_guidance(cfg) == 4.0
    cfg = load_config("configs/cdm.yaml", ["teacher.guidance=1", "method.cfg.guidance=2"])
    assert run_guidance(cfg) == 2.0


def test_clean_command_is_repo_relative_and_quoted() -> None:
    names = tuple(VARIANTS)
    old = (
        "python -m fewstep.benchmarks.dm_targets --preset shared3 --seeds 0 --out /tmp/dmt/runs3 --w 4 "
        "--only cdm tuned, CA only cdm tuned (fake=final, ca_norm=cfg) dmd2 (1-step) --tag _s0"
    )
    new = clean_command(old, names)
    assert "/tmp" not in new and "--out runs/dm_targets " in new
    argv = shlex.split(new)
    only = argv[argv.index("--only") + 1 : argv.index("--tag")]
    assert only == ["cdm tuned, CA only", "cdm tuned (fake=final, ca_norm=cfg)", "dmd2 (1-step)"]
    assert clean_command(new, names) == new


def _part(steps: int, w: str, value: float, sep: float) -> dict:
    rec = {"metrics": {str(k): {"guided_ode": value, "tilted": value + 0.1, "mixture": value + 0.2} for k in (1, 2, 4)}}
    pairs = {"guided_ode vs tilted": sep, "guided_ode vs mixture": sep, "tilted vs mixture": sep}
    return {
        "preset": "shared3",
        "commands": [f"cmd {steps} {w}"],
        "seeds": [0, 1, 2],
        "n": 1000,
        "run": {"steps": steps, "lr": 3e-4},
        "pretrain_steps": 1000,
        "separation": {w: {str(s): {k: v + 0.001 * s for k, v in pairs.items()} for s in range(3)}},
        "teacher": {},
        "students": {"dmd2 (1-step)": {w: {str(s): rec for s in range(3)}}},
    }


def test_merge_keeps_budgets_apart_and_round_trips() -> None:
    """Two budgets of one variant at one w stay two rows; a merged file split into parts merges to itself."""
    init = _part(150, "4", 0.2, 0.1)
    init["students"] = {"teacher init (not trained)": init["students"]["dmd2 (1-step)"]}
    merged = merge([_part(150, "4", 0.3, 0.1), _part(1000, "4", 0.05, 0.1), init])
    assert set(merged["students"]["dmd2 (1-step)"]["4"]) == {"150", "1000"}
    assert set(merged["students"]["teacher init (not trained)"]["4"]) == {"0"}  # scored untrained
    assert merge(as_parts({"shared3": merged})) == merged
    rows = [r for r in students_table(merged) if r.startswith("| 4 |") and "dmd2" in r]
    assert [r.split(" | ")[1] for r in rows] == ["150"] * 3 + ["1000"] * 3
    assert "at none" in rows[0] and rows[-1].endswith("| ODE |")


def test_students_table_says_targets_coincide_where_they_are_not_apart() -> None:
    """At w = 1 the targets' separation is ~0 (interval reaches 0): no 'nearest'/'at none' verdict is given."""
    rows = students_table(merge([_part(150, "1", 0.05, -0.001)]))
    verdicts = [r.rsplit(" | ", 1)[1] for r in rows if r.startswith("| 1 |")]
    assert verdicts == ["targets coincide |"] * 3


def test_ablation_table_pairs_each_ablation_with_its_full_variant() -> None:
    """Δ = ablation − full per seed: an ablation 0.2 closer to every target reads −0.200, resolved (*)."""
    full, abl = _part(150, "4", 0.3, 0.1), _part(150, "4", 0.1, 0.1)
    abl["students"] = {"dmd2, no regression": abl["students"]["dmd2 (1-step)"]}
    rows = [r for r in ablation_table(merge([full, abl])) if r.startswith("| 4 |")]
    assert len(rows) == 1 and "| dmd2, no regression | dmd2 (1-step) | 3 |" in rows[0]
    assert rows[0].count("-0.200 ± 0.000*") == 3
    assert ablation_table(merge([full])) == []  # no ablation, no section
