"""Random mixtures: deterministic per seed, the promised ranges, valid mixtures, and the ``random:<seed>`` name."""

import pytest
import torch

from fewstep.config.build import build_teacher
from fewstep.config.schema import TeacherConfig
from fewstep.data.datasets import get_dataset
from fewstep.teachers.presets import load_preset
from fewstep.teachers.random_mixtures import (
    COMPONENT_RANGE,
    DIM_RANGE,
    parse_random_name,
    random_mixture,
    random_mixture_spec,
    random_mixture_suite,
)


def test_same_seed_same_mixture_and_different_seeds_differ():
    a, b, c = random_mixture_spec(3), random_mixture_spec(3), random_mixture_spec(4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[1].shape != c[1].shape or not torch.allclose(a[1], c[1])


@pytest.mark.parametrize("seed", range(40))
def test_ranges_weights_and_covariances(seed):
    w, mu, cov = random_mixture_spec(seed)
    k, d = mu.shape
    assert DIM_RANGE[0] <= d <= DIM_RANGE[1] and COMPONENT_RANGE[0] <= k <= COMPONENT_RANGE[1]
    assert w.shape == (k,) and cov.shape == (k, d, d)
    assert abs(float(w.sum()) - 1.0) < 1e-12 and bool((w > 0).all())
    assert float(w.max() - w.min()) > 1e-3  # unequal weights
    assert torch.allclose(cov, cov.transpose(1, 2))
    lam = torch.linalg.eigvalsh(cov)
    assert float(lam.min()) >= 0.08**2 * (1 - 1e-9) and float(lam.max()) <= 0.5**2 * (1 + 1e-9)
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    assert float(off.abs().max()) > 1e-4  # full (rotated), not diagonal


def test_suite_spans_dimensions_and_sizes():
    dims = {random_mixture_spec(s)[1].shape[1] for s in range(10)}
    ks = {random_mixture_spec(s)[1].shape[0] for s in range(10)}
    assert len(dims) >= 4 and len(ks) >= 3
    suite = random_mixture_suite(10, base_seed=0)
    assert list(suite) == [f"random:{i}" for i in range(10)]
    assert torch.equal(suite["random:7"].means, random_mixture(7).means)


def test_scale_comparable_to_presets():
    """Per-coordinate spread of the data between ~0.5x and ~2x that of ring8 / aniso3."""
    ref = [
        float(load_preset(n).sample(4000, generator=torch.Generator().manual_seed(0)).std(0).mean())
        for n in ("ring8", "aniso3")
    ]
    for s in range(10):
        std = float(random_mixture(s).sample(4000, generator=torch.Generator().manual_seed(0)).std(0).mean())
        assert 0.5 * min(ref) < std < 2.0 * max(ref), (s, std, ref)


def test_explicit_dim_and_components_and_conditional():
    t = random_mixture(5, dim=3, n_components=4, conditional=True)
    assert t.dim == 3 and t.weights.shape == (4,) and t.num_classes == 4
    x = t.sample(16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 3)
    v = t.velocity(x, 0.5)
    assert v.shape == (16, 3) and bool(torch.isfinite(v).all())


def test_name_resolves_everywhere():
    t = load_preset("random:3")
    assert torch.equal(t.means, random_mixture(3).means)
    built = build_teacher(TeacherConfig(kind="preset", name="random:3"))
    assert torch.equal(built.means, t.means)
    ds = get_dataset("random:3")
    x, labels = ds.sample(8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, t.dim) and labels is None


@pytest.mark.parametrize("bad", ["random:", "random:x", "random:-1", "random:1.5"])
def test_bad_names_one_clear_error(bad):
    with pytest.raises(ValueError, match="random:<seed>"):
        load_preset(bad)
    with pytest.raises(ValueError, match="random:<seed>"):
        parse_random_name(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 0, "dim": 1}, "dim"),
        ({"seed": 0, "dim": 17}, "dim"),
        ({"seed": 0, "n_components": 2}, "n_components"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_mixture(**kwargs)
    with pytest.raises(ValueError, match="suite size"):
        random_mixture_suite(0)
