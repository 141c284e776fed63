"""Tests of the datasets: shapes, dtypes, labels, reproducibility, support and moments."""

from __future__ import annotations

import math

import pytest
import torch

from _core_helpers import assert_moments, mixture_moments
from fewstep.data.datasets import DATASETS, DigitsDataset, MixtureDataset, TensorDataset, get_dataset
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)

# name, kwargs, event_shape, num_classes
SPECS = [
    ("ring8", {}, (2,), None), ("ring8", {"conditional": True}, (2,), 4),
    ("aniso3", {"conditional": True}, (2,), 3), ("grid", {}, (2,), None), ("grid", {"conditional": True}, (2,), 2),
    ("checkerboard", {}, (2,), None), ("checkerboard", {"conditional": True}, (2,), 2),
    ("moons", {}, (2,), 2), ("moons", {"conditional": False}, (2,), None), ("spirals", {}, (2,), 2),
    ("digits", {}, (64,), 10), ("digits", {"image": True, "split": "test"}, (1, 8, 8), 10),
    ("digits_gmm", {}, (64,), 10),
]


@pytest.mark.parametrize("name,kwargs,shape,num_classes", SPECS)
def test_shapes_dtypes_labels_reproducible(name: str, kwargs: dict, shape: tuple, num_classes: int | None) -> None:
    ds = get_dataset(name, **kwargs)
    assert ds.event_shape == shape and ds.num_classes == num_classes
    x, y = ds.sample(500, generator=torch.Generator().manual_seed(0))
    assert x.shape == (500, *shape) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    if num_classes is None:
        assert y is None
    else:
        assert y.shape == (500,) and y.dtype == torch.long
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
        assert len(torch.unique(y)) == num_classes  # every class shows up in 500 draws
    x2, y2 = ds.sample(500, generator=torch.Generator().manual_seed(0))
    x3, _ = ds.sample(500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and (y is None or torch.equal(y, y2))
    assert not torch.equal(x, x3)
    assert ds.sample(0)[0].shape == (0, *shape)


def test_registry_and_errors(tmp_path) -> None:
    assert set(DATASETS) >= {"ring8", "aniso3", "grid", "checkerboard", "moons", "spirals", "digits"}
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*ring8"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['radius'\] for dataset 'moons'"):
        get_dataset("moons", radius=2.0)
    with pytest.raises(ValueError, match="unknown split"):
        get_dataset("digits", split="val")
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        get_dataset("moons").sample(-1)
    with pytest.raises(ValueError, match="conditional=True but the mixture has no classes"):
        MixtureDataset(load_preset("ring8"), conditional=True)
    path = tmp_path / "mix.json"
    load_preset("aniso3", conditional=True).to_json(path)
    ds = get_dataset(str(path))
    assert ds.num_classes == 3 and ds.sample(4)[0].shape == (4, 2)


def test_mixture_dataset_moments_and_labels() -> None:
    teacher = load_preset("ring8", conditional=True)
    ds = MixtureDataset(teacher)
    x, y = ds.sample(20000, generator=torch.Generator().manual_seed(3))
    mean, cov = mixture_moments(teacher, 0.0)
    assert_moments(x, mean, cov, z=5.5)
    # each label's points sit on its two opposite components: angle mod pi = c * pi/4
    ang = torch.atan2(x[:, 1].double(), x[:, 0].double()) % math.pi
    diff = (ang - y.double() * math.pi / 4 + math.pi / 2) % math.pi - math.pi / 2
    assert float(diff.abs().max()) < 0.35  # 0.1/2 rad per std: 7 sigma
    freq = torch.bincount(y, minlength=4).double() / len(y)
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)


def test_checkerboard_support_and_uniformity() -> None:
    ds = get_dataset("checkerboard", conditional=True)
    x, y = ds.sample(16000, generator=torch.Generator().manual_seed(4))
    assert float(x.abs().max()) <= 2.0
    col, row = torch.floor(x[:, 0] + 2).long(), torch.floor(x[:, 1] + 2).long()
    assert bool(((row + col) % 2 == 0).all())  # dark squares only
    assert torch.equal(y, row % 2)
    counts = torch.bincount(row * 4 + col, minlength=16).double()
    dark = counts[[i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]]
    assert torch.allclose(dark / 16000, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.015)
    frac = x + 2 - torch.floor(x + 2)  # uniform within a square: mean 1/2, variance 1/12
    assert torch.allclose(frac.mean(0).double(), torch.full((2,), 0.5, dtype=torch.float64), atol=0.01)
    assert torch.allclose(frac.var(0).double(), torch.full((2,), 1 / 12, dtype=torch.float64), atol=0.005)


def test_moons_and_spirals_geometry() -> None:
    moons = get_dataset("moons", noise=0.0)
    x, y = moons.sample(4000, generator=torch.Generator().manual_seed(5))
    z = x.double() / 1.5 + torch.tensor([0.5, 0.25], dtype=torch.float64)  # undo centring and scaling
    r0 = z[y == 0].norm(dim=1)
    r1 = (z[y == 1] - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    assert torch.allclose(r0, torch.ones_like(r0), atol=1e-5) and torch.allclose(r1, torch.ones_like(r1), atol=1e-5)
    assert float(z[y == 0, 1].min()) >= -1e-6 and float(z[y == 1, 1].max()) <= 0.5 + 1e-6
    spirals = get_dataset("spirals", noise=0.0)
    x, y = spirals.sample(4000, generator=torch.Generator().manual_seed(6))
    r = x.double().norm(dim=1)
    assert float(r.max()) <= 2.0 + 1e-5
    theta_max = 2 * math.pi * 1.5  # r = R theta / theta_max, class c rotated by c*pi
    th = r / 2.0 * theta_max + math.pi * y.double()
    assert torch.allclose(x.double(), torch.stack([r * torch.cos(th), r * torch.sin(th)], 1), atol=1e-4)
    assert abs(float((r / 2.0).pow(2).mean()) - 0.5) < 0.02  # theta = sqrt(u) theta_max: E[(r/R)^2] = 1/2


def test_digits() -> None:
    train, test, full = DigitsDataset("train"), DigitsDataset("test"), DigitsDataset("all")
    assert len(train) + len(test) == len(full) == 1797 and len(test) == round(0.2 * 1797)
    xa, ya = full.tensors()
    assert xa.shape == (1797, 64) and ya.shape == (1797,)
    assert float(xa.min()) == -1.0 and float(xa.max()) == 1.0
    assert torch.allclose(xa * 8 + 8, torch.round(xa * 8 + 8), rtol=0, atol=1e-6)  # x/8 - 1 of ints 0..16
    rows = {tuple(r) for r in train.x.tolist()}
    assert sum(tuple(r) in rows for r in test.x.tolist()) <= 5  # disjoint up to duplicate images in sklearn
    assert torch.equal(DigitsDataset("train").x, train.x)  # fixed split
    assert not torch.equal(DigitsDataset("train", seed=1).x, train.x)
    img = DigitsDataset("train", image=True)
    assert torch.equal(img.x.reshape(-1, 64), train.x) and img.event_shape == (1, 8, 8)
    x, y = train.sample(3000, generator=torch.Generator().manual_seed(0))
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert len(torch.unique(x, dim=0)) <= len(train) < 3000  # a finite set drawn with replacement
    tds = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 1]))
    xs, ys = tds.sample(50, generator=torch.Generator().manual_seed(0))
    idx = (xs[:, 0] / 2).long()  # row i is (2i, 2i + 1)
    assert torch.equal(xs, tds.x[idx]) and torch.equal(ys, tds.labels[idx])
    assert set(idx.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="labels must have shape"):
        TensorDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
