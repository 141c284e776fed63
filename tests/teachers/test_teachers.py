"""Acceptance tests of the analytic Gaussian-mixture teacher, the presets and ModuleTeacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from _core_helpers import assert_moments, mixture_moments, mmd2
from fewstep.core.flowmap import FlowMap
from fewstep.networks.mlp import MLP
from fewstep.sampling.samplers import solve, solve_adaptive
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.module import ModuleTeacher
from fewstep.teachers.presets import PRESETS, load_preset

torch.set_num_threads(1)

CASES = [("ring8", False), ("ring8", True), ("aniso3", False), ("aniso3", True), ("digits", True)]


def _setup(name: str, conditional: bool, n: int = 16, seed: int = 0) -> tuple[GaussianMixtureTeacher, Tensor, Tensor,
                                                                             Tensor | None]:
    """Teacher, points x ~ p_t (float64), per-row times t in [0.02, 0.95], labels with some -1 rows."""
    g = torch.Generator().manual_seed(seed)
    teacher = load_preset(name, conditional=conditional)
    t = 0.02 + 0.93 * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = teacher.sample(n, generator=g, dtype=torch.float64)
    x = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    cond = None
    if conditional:
        cond = torch.randint(-1, teacher.num_classes, (n,), generator=g)
        cond[0] = -1
    return teacher, x, t, cond


# ------------------------------------------------------------------------------- presets
def test_preset_structure() -> None:
    ring = load_preset("ring8", conditional=True)
    assert torch.allclose(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    eye = torch.eye(2, dtype=torch.float64).expand(8, 2, 2)
    assert torch.allclose(ring.covariances, 0.01 * eye, rtol=1e-15, atol=1e-15)
    assert ring.num_classes == 4
    for c in range(4):  # class c = opposite pair {c, c+4}
        idx = (ring.classes == c).nonzero()[:, 0]
        assert idx.tolist() == [c, c + 4]
        assert torch.allclose(ring.means[idx[0]], -ring.means[idx[1]], rtol=1e-12, atol=1e-12)
    aniso = load_preset("aniso3", conditional=True)
    assert torch.allclose(aniso.weights, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    lam = torch.linalg.eigvalsh(aniso.covariances)
    assert bool((lam[:, 1] / lam[:, 0] > 4).all())  # elongated
    assert bool((aniso.covariances[:, 0, 1].abs() > 1e-3).all())  # rotated
    grid = load_preset("grid", conditional=True)
    cells = ((grid.means + 2) // 1).long()
    assert bool(((cells.sum(1) % 2) == 0).all()) and len({tuple(m) for m in grid.means.tolist()}) == 8
    assert grid.classes.tolist() == (cells[:, 1] % 2).tolist()
    assert load_preset("ring8").num_classes is None and set(PRESETS) == {"ring8", "aniso3", "grid", "digits",
                                                                                       "shared3", "overlap2"}


def test_digits_preset() -> None:
    d = load_preset("digits")
    assert d.event_shape == (64,) and d.num_classes == 10
    assert abs(float(d.weights.sum()) - 1) < 1e-12 and float(d.eigvals.min()) >= 0.99e-2  # reg_covar 1e-2
    from sklearn.datasets import load_digits

    dd = load_digits()
    freq = torch.bincount(torch.as_tensor(dd.target), minlength=10).double() / len(dd.target)
    assert torch.allclose(d.class_weights, freq, rtol=1e-12, atol=1e-12)
    mean = (d.weights[:, None] * d.means).sum(0)
    assert torch.allclose(mean, torch.as_tensor(dd.data / 8 - 1).mean(0), rtol=1e-6, atol=1e-6)
    assert load_preset("digits") is not load_preset("digits")  # fresh objects; fitting is cached


def test_json_preset(tmp_path) -> None:
    t = load_preset("aniso3", conditional=True)
    p = tmp_path / "m.json"
    t.to_json(p)
    t2 = load_preset(str(p), conditional=True)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(t2.velocity(x, 0.3), t.velocity(x, 0.3), rtol=1e-14, atol=1e-14)
    assert t2.num_classes == 3


# ------------------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("name,conditional", CASES)
def test_velocity_score_identity(name: str, conditional: bool) -> None:
    teacher, x, t, cond = _setup(name, conditional)
    v = teacher.velocity(x, t, cond)
    sc = teacher.exact_score(x, t, cond)
    ref = -(x + t[:, None] * sc) / (1 - t[:, None])
    assert v.dtype == torch.float64
    assert torch.allclose(v, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,conditional", CASES)
def test_score_is_grad_log_prob(name: str, conditional: bool) -> None:
    teacher, x, t, cond = _setup(name, conditional)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(teacher.log_prob(xr, t, cond).sum(), xr)
    assert torch.allclose(teacher.exact_score(x, t, cond), g, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,conditional", CASES)
def test_continuity_equation(name: str, conditional: bool) -> None:
    r""":math:`\partial_t \log p_t + \nabla\cdot v + v\cdot\nabla\log p_t = 0` along (x, t)."""
    teacher, x, t, cond = _setup(name, conditional, n=6 if name == "digits" else 16)
    h = 1e-5
    dlogp = (teacher.log_prob(x, t + h, cond) - teacher.log_prob(x, t - h, cond)) / (2 * h)
    xr = x.clone().requires_grad_(True)
    v = teacher.velocity(xr, t, cond)
    div = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(x.shape[1]):
        (gi,) = torch.autograd.grad(v[:, i].sum(), xr, retain_graph=True)
        div = div + gi[:, i]
    resid = dlogp + div + (v.detach() * teacher.exact_score(x, t, cond)).sum(1)
    scale = 1 + dlogp.abs() + div.abs()
    assert float((resid.abs() / scale).max()) < 1e-5, resid


@pytest.mark.parametrize("name", ["ring8", "aniso3", "digits"])
def test_class_log_prob_consistency(name: str) -> None:
    r""":math:`\log p_t(x) = \mathrm{logsumexp}_c[\log p_t(x|c) + \log \pi_c]` at several t."""
    teacher = load_preset(name, conditional=True)
    g = torch.Generator().manual_seed(1)
    x = teacher.sample(8, t=0.3, generator=g, dtype=torch.float64)
    for t in (0.0, 0.3, 0.9):
        per_class = torch.stack([teacher.log_prob(x, t, torch.full((8,), c)) + torch.log(teacher.class_weights[c])
                                 for c in range(teacher.num_classes)], 1)
        assert torch.allclose(torch.logsumexp(per_class, 1), teacher.log_prob(x, t), rtol=1e-10, atol=1e-10)
        null = teacher.log_prob(x, t, torch.full((8,), -1))
        assert torch.allclose(null, teacher.log_prob(x, t), rtol=1e-12, atol=1e-12)


def test_gaussian_log_prob_closed_form() -> None:
    r"""One component: :math:`\log N(x; \alpha\mu, \alpha^2\Sigma + \sigma^2 I)` by torch.distributions."""
    cov = torch.tensor([[[0.5, 0.2], [0.2, 0.3]]], dtype=torch.float64)
    teacher = GaussianMixtureTeacher([1.0], [[1.0, -2.0]], cov, path="cosine")
    x = torch.randn(7, 2, dtype=torch.float64)
    for t in (0.0, 0.4, 1.0):
        a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        ref = torch.distributions.MultivariateNormal(a * teacher.means[0], a * a * cov[0] + s * s * torch.eye(2,
                                                     dtype=torch.float64)).log_prob(x)
        tt = torch.full((7,), t, dtype=torch.float64)  # a Python float t is rounded to float32 by as_time
        assert torch.allclose(teacher.log_prob(x, tt), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ring8", "aniso3"])
def test_guidance(name: str) -> None:
    teacher, x, t, cond = _setup(name, True)
    v_u, v_c = teacher.velocity(x, t), teacher.velocity(x, t, cond)
    for w in (0.0, 2.5):
        assert torch.allclose(teacher.velocity(x, t, cond, guidance=w), v_u + w * (v_c - v_u), rtol=1e-12, atol=1e-12)
    assert torch.allclose(teacher.velocity(x, t, cond, guidance=1.0), v_c, rtol=0, atol=0)
    null = cond < 0
    assert torch.allclose(teacher.velocity(x, t, cond, guidance=3.0)[null], v_u[null], rtol=1e-12, atol=1e-12)
    lab = cond.clamp(min=0)  # conditional field of class c = field of the sub-mixture of class c
    for c in range(teacher.num_classes):
        m = teacher.classes == c
        sub = GaussianMixtureTeacher(teacher.weights[m] / teacher.weights[m].sum(), teacher.means[m],
                                     teacher.covariances[m])
        rows = lab == c
        ref = sub.velocity(x[rows], t[rows])
        v_class = teacher.velocity(x[rows], t[rows], torch.full((int(rows.sum()),), c))
        assert torch.allclose(v_class, ref, rtol=1e-10, atol=1e-10)
    assert float((v_c[~null] - v_u[~null]).abs().max()) > 1e-2  # conditioning matters


@pytest.mark.parametrize("name,conditional,t", [("aniso3", False, 0.0), ("aniso3", True, 0.5), ("ring8", True, 0.8),
                                                ("digits", True, 0.3)])
def test_sample_moments(name: str, conditional: bool, t: float) -> None:
    teacher = load_preset(name, conditional=conditional)
    g = torch.Generator().manual_seed(3)
    n = 20000 if teacher.dim == 2 else 6000
    c = 1 if conditional else None
    cond = torch.full((n,), c) if conditional else None
    x = teacher.sample(n, t=t, cond=cond, generator=g, dtype=torch.float64)
    mean, cov = mixture_moments(teacher, t, c)
    assert_moments(x, mean, cov, z=5.5)


def test_adaptive_solver_reaches_mmd_floor() -> None:
    """dopri5 samples of the exact ring8 teacher are as close to p_0 as an independent exact sample set."""
    teacher = load_preset("ring8")
    n = 2000
    x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = solve_adaptive(teacher.velocity, x1, rtol=1e-5, atol=1e-5)
    ref = teacher.sample(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    floor = [mmd2(teacher.sample(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64), ref)
             for s in (2, 3)]
    bound = max(abs(f) for f in floor) + 1e-3
    assert abs(mmd2(res.x, ref)) < bound, floor
    assert mmd2(solve(teacher.velocity, x1, 8).x, ref) > bound  # the test resolves 8 Euler steps (peer: 0.0088)


# ------------------------------------------------------------------------------- bad input
def test_bad_mixtures(tmp_path) -> None:
    eye = torch.eye(2).expand(2, 2, 2)
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianMixtureTeacher([0.5, 0.5], [[0, 0], [1, 1]], torch.stack([torch.eye(2), -torch.eye(2)]))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixtureTeacher([0.5, 0.6], [[0, 0], [1, 1]], eye)
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixtureTeacher([0.5, 0.5], [[0, 0, 0]], eye)
    with pytest.raises(ValueError, match="covariances must have shape"):
        GaussianMixtureTeacher([0.5, 0.5], [[0, 0], [1, 1]], torch.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixtureTeacher([1.0], [[0, 0]], [[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="unknown preset 'ring9'.*ring8"):
        load_preset("ring9")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="JSON object"):
        load_preset(str(bad))
    bad.write_text(json.dumps({"weights": [1.0], "means": [[0.0, 0.0]]}))
    with pytest.raises(ValueError, match="missing required keys.*covariances"):
        load_preset(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preset(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(str(tmp_path / "missing.json"))


def test_bad_calls() -> None:
    teacher = load_preset("ring8", conditional=True)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        teacher.velocity(x, 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        teacher.velocity(x, torch.tensor([0.1, 0.2, -0.1, 0.3]))
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        teacher.velocity(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        teacher.velocity(x, torch.zeros(3))
    with pytest.raises(ValueError, match="class labels must lie"):
        teacher.velocity(x, 0.5, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        load_preset("ring8").velocity(x, 0.5, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t must lie"):
        teacher.sample(3, t=-0.5)


# ------------------------------------------------------------------------------- ModuleTeacher
class _ExactPrediction(nn.Module):
    """A 'network' returning the analytic teacher's prediction of a given type (signature net(x, t, cond))."""

    def __init__(self, teacher: GaussianMixtureTeacher, kind: str) -> None:
        super().__init__()
        self.teacher, self.kind = teacher, kind

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        v = self.teacher.velocity(x, t, cond)
        return self.teacher.path.convert(v, x, t, "velocity", self.kind)


@pytest.mark.parametrize("kind", ["velocity", "x0", "noise", "score"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_module_teacher_conversions(kind: str, path: str) -> None:
    teacher = load_preset("ring8", conditional=True, path=path)
    mt = ModuleTeacher(_ExactPrediction(teacher, kind), prediction=kind, path=path, event_shape=(2,), num_classes=4)
    assert not mt.takes_s
    _, x, t, cond = _setup("ring8", True)
    for w in (1.0, 2.0):
        assert torch.allclose(mt.velocity(x, t, cond, guidance=w), teacher.velocity(x, t, cond, guidance=w),
                              rtol=1e-8, atol=1e-8)
    ends = mt.velocity(x[:2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert bool(torch.isfinite(ends).all())
    if kind != "velocity":  # clamped: equals the exact field at t_eps / 1 - t_eps
        tc = torch.tensor([1e-4, 1 - 1e-4], dtype=torch.float64)
        assert torch.allclose(ends, teacher.velocity(x[:2], tc), rtol=1e-6, atol=1e-6)


def test_module_teacher_mlp_and_flowmap() -> None:
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=2, num_classes=3).double()
    mt = ModuleTeacher(net)
    assert mt.takes_s and mt.event_shape == (2,) and mt.num_classes == 3
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, -1, 0])
    assert torch.allclose(mt.velocity(x, t, cond), net(x, t, t, cond), rtol=0, atol=0)
    assert torch.allclose(mt.velocity(x, t), net(x, t, t, torch.full((5,), -1)), rtol=0, atol=0)
    fm = FlowMap(net, "velocity")
    mf = ModuleTeacher.from_flowmap(fm)
    assert mf.num_classes == 3 and mf.event_shape == (2,)
    guided = mf.velocity(x, t, cond, guidance=1.5)
    assert torch.allclose(guided, mt.velocity(x, t, cond, guidance=1.5), rtol=1e-14, atol=1e-14)
    assert torch.allclose(mf.velocity(x, t, cond), fm.velocity(x, t, cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown prediction type"):
        ModuleTeacher(net, prediction="eps")
    with pytest.raises(ValueError, match="event_shape is required"):
        ModuleTeacher(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="t_eps"):
        ModuleTeacher(net, prediction="x0", t_eps=0.0)
