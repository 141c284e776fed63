"""Tests added to kill mutants of core/paths.py that the older tests let survive (tools/mutation.py)."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.paths import CosinePath, GeneralAffinePath, LinearPath

torch.set_num_threads(1)


def test_interpolate_is_the_point_not_the_velocity() -> None:
    """interpolate returns x_t = alpha x0 + sigma x1 (not the conditional velocity alpha' x0 + sigma' x1)."""
    x0, x1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    path = CosinePath()
    t = torch.full((5,), 0.3, dtype=torch.float64)
    a, s, _, _ = path.coefficients(t)
    torch.testing.assert_close(path.interpolate(x0, x1, t), a[:, None] * x0 + s[:, None] * x1)


def test_boundary_check_tolerates_1e_7_errors() -> None:
    """Boundary values off by 5e-7 (e.g. a path written in float32) are accepted: the check uses atol 1e-6."""
    GeneralAffinePath(lambda t: 1 - t + 5e-7 * t, lambda t: t)  # alpha(1) = 5e-7
    GeneralAffinePath(lambda t: 1 - t, lambda t: t + 5e-7 * (1 - t))  # sigma(0) = 5e-7


@pytest.mark.parametrize("sigma", [lambda t: 0.5 * t, lambda t: t + 0.01 * (1 - t)])
def test_wrong_sigma_boundary_is_refused_with_a_clear_message(sigma) -> None:  # noqa: ANN001
    """sigma(1) != 1 or sigma(0) != 0 (by more than 1e-6) is a ValueError that states the four conditions."""
    with pytest.raises(ValueError, match=r"^a path needs alpha\(0\)=1, alpha\(1\)=0, sigma\(0\)=0, sigma\(1\)=1; got"):
        GeneralAffinePath(lambda t: 1 - t, sigma)


def test_given_derivatives_are_used_as_given() -> None:
    """User derivatives d_alpha, d_sigma are returned as given (not recomputed by autograd)."""
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    path = GeneralAffinePath(
        lambda u: 1 - u, lambda u: u, d_alpha=lambda u: 2 * torch.ones_like(u), d_sigma=lambda u: 3 * torch.ones_like(u)
    )
    _, _, da, ds = path.coefficients(t)
    torch.testing.assert_close(da, torch.full_like(t, 2.0))
    torch.testing.assert_close(ds, torch.full_like(t, 3.0))


def test_repr_names_the_class() -> None:
    assert repr(LinearPath()) == "LinearPath()" and repr(CosinePath()) == "CosinePath()"
