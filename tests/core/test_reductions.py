"""The named per-sample error reductions of core.utils (sum over event dims vs mean over event dims)."""

from __future__ import annotations

import torch

from fewstep.core.utils import per_sample_mean_sq, per_sample_sq_norm


def test_sum_and_mean_conventions_on_known_values() -> None:
    x = torch.tensor([[3.0, 4.0], [1.0, -1.0]], dtype=torch.float64)
    assert per_sample_sq_norm(x).tolist() == [25.0, 2.0]
    assert per_sample_mean_sq(x).tolist() == [12.5, 1.0]
    img = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    d = 12
    assert per_sample_sq_norm(img).shape == (2,)
    assert torch.allclose(per_sample_sq_norm(img), d * per_sample_mean_sq(img), rtol=1e-15, atol=0)
    assert float(per_sample_sq_norm(img)[0]) == sum(float(v) ** 2 for v in range(12))
    # the batch mean of the mean-square convention is the element-wise MSE
    assert torch.allclose(per_sample_mean_sq(img).mean(), img.pow(2).mean(), rtol=1e-14, atol=0)


def test_leading_batch_dims() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)  # (steps, batch, event)
    out = per_sample_sq_norm(v, batch_dims=2)
    assert out.shape == (5, 7)
    assert torch.equal(out, (v**2).sum(-1))
    assert torch.equal(per_sample_mean_sq(v, batch_dims=2), (v**2).mean(-1))
