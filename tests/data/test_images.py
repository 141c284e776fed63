"""Tests of the image datasets digits8 and digits16 (shapes, scaling, determinism, splits, names)."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.datasets import DATASETS, get_dataset
from fewstep.data.images import Digits16Dataset, augmented_digits16, real_images

torch.set_num_threads(1)


def test_digits8_images() -> None:
    d = get_dataset("digits8", split="all")
    x, y = d.tensors()
    assert x.shape == (1797, 1, 8, 8) and d.event_shape == (1, 8, 8) and d.num_classes == 10
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # v/8 - 1 for v in 0..16
    assert torch.equal(torch.bincount(y), torch.bincount(get_dataset("digits", split="all").labels))
    xb, yb = get_dataset("digits8").sample(7, torch.Generator().manual_seed(0))
    assert xb.shape == (7, 1, 8, 8) and yb.shape == (7,)


def test_digits16_shape_range_and_copies() -> None:
    d = get_dataset("digits16", split="train")
    n8 = len(get_dataset("digits8", split="train"))
    assert isinstance(d, Digits16Dataset) and len(d) == 8 * n8 and d.event_shape == (1, 16, 16)
    assert float(d.x.min()) >= -1.0 and float(d.x.max()) <= 1.0 and float(d.x.max()) > 0.9
    assert float((d.x < -0.95).float().mean()) > 0.3  # much of every image is background (-1)
    # copy 0 is the bilinear upsampling of the 8x8 digit: its 2x2 block means recover the digit closely
    x8 = get_dataset("digits8", split="train").x
    down = torch.nn.functional.avg_pool2d(d.x[:n8], 2)
    assert float((down - x8).abs().mean()) < 0.15
    # augmented copies differ from copy 0 but keep the labels and most of the ink
    diff = (d.x[n8:2 * n8] - d.x[:n8]).abs().flatten(1).mean(1)
    assert float((diff > 1e-3).float().mean()) > 0.95
    assert torch.equal(d.labels[n8:2 * n8], d.labels[:n8])
    ink0, ink1 = (d.x[:n8] + 1).sum((1, 2, 3)), (d.x[n8:2 * n8] + 1).sum((1, 2, 3))
    assert float((ink1 / ink0).median()) == pytest.approx(1.0, abs=0.15)


def test_digits16_deterministic_and_split() -> None:
    augmented_digits16.cache_clear()
    a, ya = augmented_digits16("test", 3, 0)
    augmented_digits16.cache_clear()
    b, yb = augmented_digits16("test", 3, 0)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    c, _ = augmented_digits16("test", 3, 1)
    n = a.shape[0] // 3
    assert torch.equal(a[:n], c[:n]) and not torch.equal(a[n:], c[n:])  # seed changes only the augmentation
    train, test = get_dataset("digits16", split="train", copies=1).x, get_dataset("digits16", split="test", copies=1).x
    assert train.shape[0] + test.shape[0] == 1797
    assert float(torch.cdist(test.flatten(1), train.flatten(1)).min()) >= 0.0  # computable: disjoint digit sets


def test_image_names_and_errors() -> None:
    assert "digits8" in DATASETS and "digits16" in DATASETS
    x, y = real_images("digits16", "test")
    assert x.shape[1:] == (1, 16, 16) and y.shape == (x.shape[0],)
    with pytest.raises(ValueError, match="copies"):
        augmented_digits16("train", 0)
    with pytest.raises(ValueError, match="unknown option"):
        get_dataset("digits16", image=True)
    with pytest.raises(ValueError, match="unknown image set"):
        real_images("cifar10")
    assert get_dataset("digits16", split="test", conditional=False).labels is None
