"""Tests of the image metrics: shipped classifier, FD at its floor, improved precision/recall, class accuracy."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.images import real_images
from fewstep.evaluation.image_features import (
    FLOOR_N,
    fd_floor,
    features,
    frechet_image_distance,
    image_metrics,
    load_classifier,
    precision_recall,
    train_classifier,
)

torch.set_num_threads(1)


def test_shipped_classifier_accuracy_matches_metadata() -> None:
    net, meta = load_classifier("digits8")
    x, y = real_images("digits8", "test")
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(float(meta["test_accuracy"]), abs=1e-4) and acc > 0.95
    assert features("digits8", x[:5]).shape == (5, 64)


def test_classifier_training_is_deterministic() -> None:
    a, acc_a = train_classifier("digits8", seed=3, epochs=1)
    b, acc_b = train_classifier("digits8", seed=3, epochs=1)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert acc_a == acc_b and all(torch.equal(p, q) for p, q in pairs)


def test_fd_sits_at_its_floor_for_two_halves_of_real_data() -> None:
    """Two disjoint halves of the real digits: FD equals the shipped floor; damaged images are far above it."""
    _, meta = load_classifier("digits8")
    floor = fd_floor("digits8")
    assert floor["fd"] == pytest.approx(float(meta["floor_fd"]), abs=1e-3)
    other = fd_floor("digits8", seed=1)["fd"]  # another random split: same order of magnitude
    assert 0.5 * floor["fd"] < other < 2.0 * floor["fd"]
    x, _ = real_images("digits8", "all")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = x[perm[:FLOOR_N["digits8"]]], x[perm[FLOOR_N["digits8"]:2 * FLOOR_N["digits8"]]]
    noisy = (b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(b, 3, stride=1, padding=1, count_include_pad=False)
    assert frechet_image_distance("digits8", a, b) == pytest.approx(floor["fd"], abs=1e-3)
    assert frechet_image_distance("digits8", a, noisy) > 3 * floor["fd"]
    assert frechet_image_distance("digits8", a, blurred) > 3 * floor["fd"]
    assert floor["precision"] > 0.8 and floor["recall"] > 0.8


def test_precision_recall_separates_quality_from_mode_dropping() -> None:
    x, y = real_images("digits8", "all")
    half = x[y < 5]  # mode dropping: real-quality images of half the classes
    m = image_metrics("digits8", half[:800], n_ref=800)
    assert m["precision"] > 0.8 and m["recall"] < 0.7
    noise = torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # no quality, spread out
    m_noise = image_metrics("digits8", noise, n_ref=800)
    assert m_noise["precision"] < 0.1 and m_noise["fd"] > m["fd"]
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(f, f) == (1.0, 1.0)
    assert precision_recall(f, f + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(f[:3], f)


def test_class_accuracy_and_errors() -> None:
    x, y = real_images("digits8", "test")
    m = image_metrics("digits8", x, labels=y, n_ref=x.shape[0])
    assert m["class_acc"] > 0.95
    wrong = image_metrics("digits8", x, labels=(y + 1) % 10, n_ref=x.shape[0])
    assert wrong["class_acc"] < 0.05
    with pytest.raises(ValueError, match="shape"):
        features("digits8", torch.zeros(4, 64))
    with pytest.raises(ValueError, match="no image classifier"):
        features("cifar10", torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        features("digits8", torch.full((4, 1, 8, 8), float("nan")))
