r"""The iCT curriculum of ``cd`` / ``ct`` follows the run's length: K = ``curriculum_fraction`` × ``train.steps``.

:math:`N(k) = \min(n_{min} 2^{\lfloor k/K'\rfloor}, n_{max})`,
:math:`K' = \lfloor K/(\log_2(n_{max}/n_{min})+1)\rfloor`; the trainer hands ``train.steps`` to
``Method.prepare``, so the schedule reaches :math:`n_{max}` before the end of any run (the bench trains 2000 steps,
the shipped ring8 config 4000), and a fixed ``curriculum_steps`` still works.
"""

from __future__ import annotations

import math

import pytest
import torch

from fewstep import MLP, FlowMap
from fewstep.api import train
from fewstep.methods import get_method
from fewstep.methods.consistency import curriculum_length, discretization_steps

torch.set_num_threads(1)


def _ct(**kw: object) -> object:
    cls = get_method("ct")
    return cls(FlowMap(MLP(2, hidden=8, depth=1, use_s=False), "consistency"), None, cls.make_config(**kw))


@pytest.mark.parametrize("steps", [5, 7, 100, 2000, 4000, 4001])
@pytest.mark.parametrize(("n_min", "n_max"), [(16, 64), (10, 100)])
def test_the_schedule_reaches_n_max_by_the_end_of_any_run(steps: int, n_min: int, n_max: int) -> None:
    """Default (fraction None = 1): N starts at n_min and is n_max at the last step, for any train.steps with at
    least one step per doubling."""
    m = _ct(n_schedule="ict", n_min=n_min, n_max=n_max)
    m.prepare({"steps": steps})
    levels = math.log2(n_max / n_min) + 1
    ns = [discretization_steps(k, m.config, m.train_steps) for k in range(steps)]
    assert ns[0] == n_min and ns[-1] == n_max
    if steps >= 3 * levels:  # every level is used for at least one step: the schedule is spread, not squeezed
        assert sorted(set(ns)) == sorted({min(n_min * 2**j, n_max) for j in range(math.ceil(levels))})


def test_fraction_sets_the_curriculum_length() -> None:
    """fraction 0.5 of 3000 steps: K = 1500, K' = 500 (16 -> 32 -> 64 at steps 500, 1000); ignoring the fraction
    (K = 3000, K' = 1000) would still be at 16 at step 500."""
    m = _ct(n_schedule="ict", n_min=16, n_max=64, curriculum_fraction=0.5)
    m.prepare({"steps": 3000})
    assert curriculum_length(m.config, 3000) == 1500
    assert [discretization_steps(k, m.config, 3000) for k in (0, 499, 500, 999, 1000, 2999)] == [16, 16, 32, 32, 64, 64]
    assert [m.times(torch.full((1,), 0.999), k)[0].item() - m.times(torch.full((1,), 0.999), k)[1].item()
            for k in (499, 500)] == pytest.approx([1 / 16, 1 / 32])  # the grid the loss trains on follows N


def test_fraction_one_equals_the_former_fixed_length_of_the_shipped_preset() -> None:
    """configs/ct.yaml: 4000 steps with fraction 1.0 is exactly the former ``curriculum_steps: 4000``."""
    frac = _ct(n_schedule="ict", n_min=16, n_max=64, curriculum_fraction=1.0).config
    fixed = _ct(n_schedule="ict", n_min=16, n_max=64, curriculum_steps=4000).config
    assert all(discretization_steps(k, frac, 4000) == discretization_steps(k, fixed, None) for k in range(4000))
    # a fixed length ignores train.steps (back-compat: old run folders and configs/images/ct.yaml)
    assert discretization_steps(1000, fixed, 2000) == 16 == discretization_steps(1000, fixed, None)


def test_the_trainer_hands_the_run_length_to_the_method() -> None:
    """Through api.train (the Trainer): 9 steps, 2 -> 4 -> 8, the last step's logged N is n_max."""
    tr = train("ct", teacher="ring8", steps=9, batch_size=16, log_every=1, student={"hidden": 8, "depth": 1},
               method_cfg={"n_schedule": "ict", "n_min": 2, "n_max": 8})
    assert tr.method.train_steps == 9
    logged = [row[k] for row in tr.history for k in row if k.endswith("N")]
    assert logged == [2.0] * 3 + [4.0] * 3 + [8.0] * 3


@pytest.mark.parametrize(("kw", "msg"), [
    ({"curriculum_fraction": 0.5, "curriculum_steps": 100}, r"^set curriculum_fraction or curriculum_steps, not both$"),
    ({"curriculum_fraction": 0.0}, r"^curriculum_fraction must lie in \(0, 1\]; got 0\.0$"),
    ({"curriculum_fraction": 1.5}, r"^curriculum_fraction must lie in \(0, 1\]; got 1\.5$"),
    ({"curriculum_steps": 0}, r"^curriculum_steps must be >= 1; got 0$"),
])
def test_invalid_curriculum_settings_are_named(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        get_method("ct").make_config(n_schedule="ict", **kw)


def test_unknown_run_length_is_an_error_not_a_silent_default() -> None:
    m = _ct(n_schedule="ict", n_min=2, n_max=8)
    with pytest.raises(ValueError, match=r"run length is unknown.*curriculum_steps"):
        m.times(torch.rand(4), 0)
    assert _ct(n_steps=5).times(torch.rand(4), 0)[0].shape == (4,)  # the fixed schedule needs no run length
