"""Tests for fewstep.evaluation.digit_features: the digit classifier's Fréchet distance has a small real-vs-real floor
and grows under corruption."""

from __future__ import annotations

import pytest
import torch

from fewstep.evaluation.digit_features import digit_feature_net, frechet_digits, frechet_digits_floor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_frechet_digits_floor_and_shift() -> None:
    from sklearn.datasets import load_digits

    _, acc = digit_feature_net()
    assert acc > 0.93
    real = torch.as_tensor(load_digits().data, dtype=torch.float32) / 8 - 1
    perm = torch.randperm(len(real), generator=_gen(0))
    a, b = real[perm[:800]], real[perm[800:1600]]
    floor = frechet_digits(a, b)
    assert floor == pytest.approx(frechet_digits_floor(800, seed=0), rel=1e-9)  # the floor uses this very split
    assert frechet_digits_floor(800, seed=1) == pytest.approx(floor, rel=0.5)  # another split: same scale
    assert floor < 8.0
    noisy = (b + 0.5 * torch.randn(b.shape, generator=_gen(1))).clamp(-1, 1)
    assert frechet_digits(a, noisy) > 5 * floor
    assert frechet_digits(a, b.roll(1, dims=1)) > 3 * floor


def test_frechet_digits_rejects_non_digit_shapes() -> None:
    with pytest.raises(ValueError, match="64-pixel"):
        frechet_digits(torch.zeros(5, 2), torch.zeros(5, 2))
