"""The tilted density of fewstep.benchmarks.guided_targets.

Its gradient is the guided score, its grid sampler is exact.
"""

import pytest
import torch

from fewstep.benchmarks.guided_targets import sample_tilted, tilted_log_density
from fewstep.evaluation.metrics import mmd2
from fewstep.teachers.presets import load_preset


@pytest.fixture(scope="module")
def ring8c():
    return load_preset("ring8", conditional=True)


def test_tilted_gradient_is_the_guided_score(ring8c):
    g = torch.Generator().manual_seed(0)
    x = (2.5 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    cond = torch.randint(0, 4, (64,), generator=g)
    for t in (0.1, 0.6):
        grad, = torch.autograd.grad(tilted_log_density(ring8c, x, cond, 3.0, t).sum(), x)
        guided = ring8c.score(x.detach(), t, cond=cond, guidance=3.0)
        torch.testing.assert_close(grad, guided, rtol=1e-6, atol=1e-6)


def test_grid_sampler_at_w1_is_the_conditional_mixture(ring8c):
    g = torch.Generator().manual_seed(1)
    cond = ring8c.sample_labels(1500, generator=g)
    x = sample_tilted(ring8c, cond, 1.0, cell=0.02, generator=g)
    ref = ring8c.sample(1500, cond=cond, generator=g, dtype=torch.float64)
    assert abs(mmd2(x, ref)) < 2e-3
    # each sample sits on one of its own class's two modes (class c = components c and c + 4)
    near = torch.cdist(x, ring8c.means.to(x)).argmin(1)
    assert bool((near % 4 == cond).all())


def test_sampler_rejects_bad_input(ring8c):
    with pytest.raises(ValueError, match="2-D"):
        sample_tilted(load_preset("ring8"), torch.zeros(3, dtype=torch.long), 3.0)
    with pytest.raises(ValueError, match="edge of the box"):
        sample_tilted(ring8c, torch.zeros(3, dtype=torch.long), 3.0, box=1.0, cell=0.02)
    with pytest.raises(ValueError, match="shape"):
        sample_tilted(ring8c, torch.zeros(3, 1, dtype=torch.long), 3.0)
