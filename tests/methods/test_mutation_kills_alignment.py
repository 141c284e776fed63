r"""Tests added to kill mutants of methods/_shared/alignment.py (tools/mutation.py).

An affine student :math:`u(x,t,c) = A x + b + e\,c` has the constant divergence tr A, so the Hutchinson estimate
with probes held fixed along the window is :math:`\Delta = (t_s - t_e)\,\frac1K\sum_k z_k^\top A z_k` exactly; the
window-end log-density and score targets are checked against the teacher's own density at the rescaled point.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep.methods._shared.alignment import end_log_prob, end_score, ma_loss, window_logdensity
from fewstep.sampling.logdensity import make_probes
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
DT = torch.float64
A0 = torch.tensor([[0.9, 0.3], [-0.2, 0.6]], dtype=DT)
B0 = torch.tensor([0.4, -0.1], dtype=DT)


class _Affine(nn.Module):
    """u(x, t, c) = A x + b + e * label (None: 0); ``fixed`` labels, when given, replace the cond argument."""

    def __init__(self, e: float = 0.7, fixed: Tensor | None = None) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
        self.e, self.fixed = e, fixed

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        lab = self.fixed if self.fixed is not None else cond
        shift = 0.0 if lab is None else self.e * lab.to(x.dtype)[:, None]
        return x @ self.a.T + self.b + shift

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x - (t - s)[:, None] * self.velocity(x, t, cond)


def _teacher(path: str = "linear") -> GaussianMixtureTeacher:
    cov = torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.3, 0.0], [0.0, 0.4]]], dtype=DT)
    return GaussianMixtureTeacher([0.5, 0.5], [[1.0, -0.5], [-1.5, 1.0]], cov, classes=[0, 1], path=path)


def _x(n: int = 6, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_student_velocity_gets_the_labels() -> None:
    """The ODE window runs the student with the batch labels: same result as a student holding those labels."""
    x, cond = _x(), torch.tensor([0, 1, 1, 0, -1, 1])
    got = ma_loss(_Affine(), _teacher(), x, 0.8, 0.1, cond, mode="exact", substeps=2, t_min=0.05)
    ref = ma_loss(_Affine(fixed=cond), _teacher(), x, 0.8, 0.1, cond, mode="exact", substeps=2, t_min=0.05)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.x_end, ref.x_end)
    unlabelled = ma_loss(_Affine(fixed=torch.zeros(6, dtype=torch.long)), _teacher(), x, 0.8, 0.1, cond,
                         mode="exact", substeps=2, t_min=0.05)
    assert float((got.x_end - unlabelled.x_end).abs().max()) > 1e-2


def test_hutchinson_delta_is_the_probe_quadratic_form() -> None:
    x = _x()
    res = ma_loss(_Affine(), _teacher(), x, 0.8, 0.3, mode="hutchinson", num_probes=3, substeps=2, solver="euler",
                  generator=torch.Generator().manual_seed(4))
    z = make_probes(x, 3, torch.Generator().manual_seed(4))
    est = torch.einsum("kbi,ij,kbj->b", z, A0, z) / 3
    assert float((est - torch.trace(A0)).abs().max()) > 0.01  # the probes do not give the exact trace
    torch.testing.assert_close(res.delta, 0.5 * est, rtol=1e-10, atol=1e-12)
    exact = ma_loss(_Affine(), _teacher(), x, 0.8, 0.3, mode="exact", substeps=2, solver="euler")
    torch.testing.assert_close(exact.delta, torch.full((6,), 0.5 * float(torch.trace(A0)), dtype=DT))


def test_defaults_are_four_substeps_and_four_probes() -> None:
    x = _x()
    kw = dict(mode="hutchinson", solver="euler")
    got = ma_loss(_Affine(), _teacher(), x, 0.8, 0.3, generator=torch.Generator().manual_seed(1), **kw)
    ref = ma_loss(_Affine(), _teacher(), x, 0.8, 0.3, substeps=4, num_probes=4,
                  generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(got.x_end, ref.x_end, rtol=0, atol=0)


def test_window_without_graph_is_detached() -> None:
    x = _x()
    ts, te = torch.full((6,), 0.8, dtype=DT), torch.full((6,), 0.3, dtype=DT)
    x_end, delta = window_logdensity(_Affine(), x, ts, te, mode="exact", substeps=2, create_graph=False)
    assert not x_end.requires_grad and not delta.requires_grad
    x_g, d_g = window_logdensity(_Affine(), x, ts, te, mode="exact", substeps=2, create_graph=True)
    assert x_g.requires_grad
    torch.testing.assert_close(x_end, x_g.detach())
    torch.testing.assert_close(delta, d_g.detach())


def test_score_teacher_is_the_target() -> None:
    x, other = _x(), GaussianMixtureTeacher([1.0], [[3.0, 3.0]], torch.eye(2, dtype=DT)[None])
    got = ma_loss(_Affine(), _teacher(), x, 0.8, 0.3, mode="exact", score_teacher=other)
    ref = ma_loss(_Affine(), other, x, 0.8, 0.3, mode="exact")
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.kl, ref.kl)
    own = ma_loss(_Affine(), _teacher(), x, 0.8, 0.3, mode="exact")
    assert abs(float(own.loss - got.loss)) > 1e-3


@pytest.mark.parametrize("n", [1, 5])
def test_end_log_prob_is_the_rescaled_teacher_density(n: int) -> None:
    r""":math:`\log\tilde p_{t_e}(x) = \log p_{\varepsilon}(c x \mid y) + d \log c`, :math:`c = \alpha_\varepsilon /
    \alpha_{t_e}` below :math:`\varepsilon` (cosine path: :math:`c = \cos(\pi\varepsilon/2)`), the teacher's own
    conditional density above; a single row works."""
    eps = 0.1
    x, cond = _x(n, seed=2), torch.tensor([0, 1, 1, 0, -1][:n])
    for path, c in (("linear", 1 - eps), ("cosine", math.cos(math.pi * eps / 2))):
        t = _teacher(path)
        zero = torch.zeros(n, dtype=DT)
        want = t.log_prob(c * x, torch.full((n,), eps, dtype=DT), cond) + 2 * math.log(c)
        torch.testing.assert_close(end_log_prob(t, x, zero, eps, cond), want)
        above = torch.full((n,), 0.4, dtype=DT)
        torch.testing.assert_close(end_log_prob(t, x, above, eps, cond), t.log_prob(x, above, cond))
    t = _teacher()
    assert float((end_log_prob(t, x, zero, eps, cond) - end_log_prob(t, x, zero, eps)).abs().max()) > 1e-2


def test_window_time_refusals_name_the_argument() -> None:
    x, s, t = _x(4), _Affine(), _teacher()
    with pytest.raises(ValueError, match=r"^t_start must be a scalar or have shape \(4,\) to match the batch; "
                                         r"got shape \(3,\)$"):
        ma_loss(s, t, x, torch.full((3,), 0.8, dtype=DT), 0.3)
    with pytest.raises(ValueError, match=r"^t_end must be a scalar or have shape \(4,\) to match the batch; "
                                         r"got shape \(3,\)$"):
        ma_loss(s, t, x, 0.8, torch.full((3,), 0.3, dtype=DT))
    msg = r"^every MA window needs t_end < t_start; got t_start in \[0\.5, 0\.5\], t_end in \[0\.5, 0\.5\]$"
    with pytest.raises(ValueError, match=msg):
        ma_loss(s, t, x, 0.5, 0.5)
    msg = r"^every MA window needs t_end < t_start; got t_start in \[0\.3, 0\.3\], t_end in \[0\.5, 0\.5\]$"
    with pytest.raises(ValueError, match=msg):
        ma_loss(s, t, x, 0.3, 0.5)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_loss_is_delta_minus_the_conditional_target_score_term(guidance: float) -> None:
    r""":math:`L_{MA} = E[\Delta - \langle sg(\tilde s(x_{end} \mid c; w)), x_{end}\rangle]` (KL only at w = 1)."""
    x, cond = _x(), torch.tensor([0, 1, 1, 0, -1, 1])
    t = _teacher()
    res = ma_loss(_Affine(), t, x, 0.8, 0.0, cond, mode="exact", substeps=2, t_min=0.05, guidance=guidance)
    te = torch.zeros(6, dtype=DT)
    score = end_score(t, res.x_end.detach(), te, 0.05, cond, guidance)
    torch.testing.assert_close(res.loss, (res.delta - (score * res.x_end).sum(1)).mean())
    uncond = end_score(t, res.x_end.detach(), te, 0.05, None, guidance)
    assert float((score - uncond).abs().max()) > 1e-2
    assert (res.kl is None) == (guidance != 1.0)


def test_t_min_refusals_by_message() -> None:
    x, s, t = _x(4), _Affine(), _teacher()
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"^ma_t_min must lie in \[0, 1\); got {bad}$"):
            ma_loss(s, t, x, 0.8, 0.3, t_min=bad)
    ma_loss(s, t, x, 0.8, 0.3, t_min=0.0)  # t_min = 0 is allowed for windows ending above 0


def test_exact_dim_selects_the_ode_estimator() -> None:
    x, s, t = _x(4), _Affine(), _teacher()
    assert ma_loss(s, t, x, 0.8, 0.3, mode="ode").mode == "exact"
    assert ma_loss(s, t, x, 0.8, 0.3, mode="ode", exact_dim=1,
                   generator=torch.Generator().manual_seed(0)).mode == "hutchinson"


@pytest.mark.parametrize("mode", ["exact", "jump"])
def test_no_probes_are_drawn_outside_hutchinson(mode: str) -> None:
    """Only the Hutchinson mode draws probes: the other modes leave the global random stream untouched."""
    torch.manual_seed(0)
    ma_loss(_Affine(), _teacher(), _x(4), 0.8, 0.3, mode=mode)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3))


@pytest.mark.parametrize("substeps", [1, 3])
def test_jump_window_gets_the_labels_and_takes_every_jump(substeps: int) -> None:
    """``jump``: M jumps of the labelled student, Δ = -Σ log|det ∂f/∂x| = -M log|det(I - hA)|, h = (t_s-t_e)/M."""
    x, cond = _x(), torch.tensor([0, 1, 1, 0, -1, 1])
    s = _Affine()
    ts, te = torch.full((6,), 0.8, dtype=DT), torch.full((6,), 0.2, dtype=DT)
    x_end, delta = window_logdensity(s, x, ts, te, cond, mode="jump", substeps=substeps)
    want, h = x, 0.6 / substeps
    for i in range(substeps):
        t0 = torch.full((6,), 0.8 - i * h, dtype=DT)
        want = s(want, t0, t0 - h, cond)
    torch.testing.assert_close(x_end, want)
    logdet = torch.linalg.slogdet(torch.eye(2, dtype=DT) - h * A0)[1]
    torch.testing.assert_close(delta, torch.full((6,), -substeps * float(logdet), dtype=DT))


def test_singular_jump_counts_as_folded() -> None:
    """A jump with det ∂f/∂x = 0 exactly is folded (it is not injective)."""

    class _Flatten(nn.Module):
        def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
            return torch.stack([x[:, 0] + x[:, 1], torch.zeros_like(x[:, 0])], dim=1)

    stats: dict[str, float] = {}
    ts, te = torch.full((4,), 0.8, dtype=DT), torch.full((4,), 0.2, dtype=DT)
    window_logdensity(_Flatten(), _x(4), ts, te, mode="jump", substeps=1, stats=stats)
    assert stats["folded"] == 1.0


def test_window_logdensity_refuses_non_decreasing_windows() -> None:
    msg = r"^every MA window needs t_end < t_start \(sampling runs from t_start down to t_end\)$"
    ts = torch.full((4,), 0.5, dtype=DT)
    for te in (ts.clone(), torch.full((4,), 0.7, dtype=DT)):
        with pytest.raises(ValueError, match=msg):
            window_logdensity(_Affine(), _x(4), ts, te, mode="exact")


def test_delta_has_the_input_dtype_whatever_the_default() -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = _x(4).float()
        s = _Affine().float()
        ts, te = torch.full((4,), 0.8), torch.full((4,), 0.2)
        for mode in ("exact", "jump"):
            _, delta = window_logdensity(s, x, ts.float(), te.float(), mode=mode, substeps=1)
            assert delta.dtype == torch.float32, mode
    finally:
        torch.set_default_dtype(old)
