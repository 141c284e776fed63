r"""Tests added to kill mutants of methods/_shared/reflow_family.py (tools/mutation.py): the MA term
:math:`\lambda L_{MA}` on the first ``ma_batch`` rows when it is on (weight > 0, step >= warm-up, every
``ma_every`` steps), its logs, the total, the MA options' refusals, and the pair handling.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from _probe_nets import LinearProbe as _Probe
from fewstep.core.flowmap import FlowMap
from fewstep.methods import Batch, get_method
from fewstep.methods._shared.alignment import ma_loss
from fewstep.methods._shared.reflow_family import add_ma, ma_term
from fewstep.teachers import GaussianMixtureTeacher

torch.set_num_threads(1)
DT = torch.float64


def _teacher() -> GaussianMixtureTeacher:
    cov = torch.eye(2, dtype=DT)[None].repeat(2, 1, 1) * 0.3
    return GaussianMixtureTeacher([0.5, 0.5], [[2.0, 0.0], [-1.0, 1.5]], cov, classes=[0, 1])


def _cfg(**kw: object):
    return get_method("reflow").make_config(**kw)


def _x(n: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


@pytest.mark.parametrize("mode", ["exact", "jump", "hutchinson"])
def test_ma_term_is_lambda_times_the_surrogate_on_the_first_rows(mode: str) -> None:
    st, t = FlowMap(_Probe(), "velocity"), _teacher()
    x, cond = _x()
    ts, te = torch.linspace(0.9, 0.6, 8, dtype=DT), torch.linspace(0.5, 0.0, 8, dtype=DT)
    cfg = _cfg(ma_weight=0.4, ma_batch=5, ma_mode=mode, ma_substeps=3, ma_solver="heun", ma_t_min=0.07,
               ma_probes=2, guidance=1.0)
    torch.manual_seed(0)  # Hutchinson probes come from the global generator
    term, logs = ma_term(st, t, cfg, x, ts, te, cond, 0)
    torch.manual_seed(0)
    res = ma_loss(st, t, x[:5], ts[:5], te[:5], cond[:5], mode=mode, substeps=3, solver="heun", num_probes=2,
                  t_min=0.07)
    torch.testing.assert_close(term, 0.4 * res.loss)
    assert logs["ma"] == pytest.approx(float(res.loss)) and logs["ma_kl"] == pytest.approx(float(res.kl))
    assert ("ma_folded" in logs) == (mode == "jump")
    if mode == "jump":
        assert logs["ma_folded"] == res.folded
    # scalar window ends and every row (ma_batch = 0)
    torch.manual_seed(1)
    term0, _ = ma_term(st, t, _cfg(ma_weight=1.0, ma_batch=0, ma_mode=mode, ma_t_min=0.07), x, 0.8, 0.0, cond, 0)
    torch.manual_seed(1)
    ref = ma_loss(st, t, x, 0.8, 0.0, cond, mode=mode, t_min=0.07).loss
    torch.testing.assert_close(term0, ref)


def test_ma_term_guidance_and_score_teacher() -> None:
    st, t = FlowMap(_Probe(), "velocity"), _teacher()
    other = GaussianMixtureTeacher([0.5, 0.5], [[3.0, 3.0], [2.0, -2.0]], torch.eye(2, dtype=DT)[None].repeat(2, 1, 1),
                                   classes=[0, 1])
    x, cond = _x()
    term, logs = ma_term(st, t, _cfg(ma_weight=1.0, ma_batch=0, guidance=2.0), x, 0.8, 0.3, cond, 0,
                         score_teacher=other)
    ref = ma_loss(st, t, x, 0.8, 0.3, cond, guidance=2.0, score_teacher=other)
    torch.testing.assert_close(term, ref.loss)
    assert "ma_kl" not in logs  # no KL estimate under guidance


def test_ma_term_schedule() -> None:
    st, t = FlowMap(_Probe(), "velocity"), _teacher()
    x, cond = _x()
    on = {"ma_weight": 0.5, "ma_warmup": 3, "ma_every": 2}
    for step, active in ((0, False), (2, False), (3, False), (4, True), (5, False), (6, True)):
        term, logs = ma_term(st, t, _cfg(**on), x, 0.8, 0.3, cond, step)
        assert (term is not None) == active and bool(logs) == active, step
    assert ma_term(st, t, _cfg(ma_weight=0.0), x, 0.8, 0.3, cond, 0) == (None, {})
    assert ma_term(st, t, _cfg(ma_weight=0.5), x, 0.8, 0.3, cond, 0)[0] is not None


def test_add_ma_total_and_logs() -> None:
    loss = torch.tensor(1.5, dtype=DT, requires_grad=True)
    total, logs = add_ma(loss, {"loss_fm": 1.5}, (torch.tensor(0.25, dtype=DT), {"ma": 0.5}))
    assert float(total) == 1.75 and logs == {"loss_fm": 1.5, "ma": 0.5, "loss": 1.75}
    total, logs = add_ma(loss, {"loss_fm": 1.5}, (None, {}))
    assert total is loss and logs == {"loss_fm": 1.5, "loss": 1.5}


@pytest.mark.parametrize(("kw", "msg"), [
    ({"ma_mode": "fisher"}, r"^unknown ma_mode 'fisher'; expected one of \('ode', 'exact', 'hutchinson', 'jump'\)$"),
    ({"ma_substeps": 0}, r"^ma_substeps must be >= 1; got 0$"),
    ({"ma_probes": 0}, r"^ma_probes must be >= 1; got 0$"),
    ({"ma_every": 0}, r"^ma_every must be >= 1; got 0$"),
    ({"ma_exact_dim": 0}, r"^ma_exact_dim must be >= 1; got 0$"),
    ({"ma_weight": -0.1}, r"^need ma_weight >= 0, 0 < ma_t_min < 1, ma_batch >= 0; got -0\.1, 0\.02, 256$"),
    ({"ma_t_min": 0.0}, r"^need ma_weight >= 0, 0 < ma_t_min < 1, ma_batch >= 0; got 0\.0, 0\.0, 256$"),
    ({"ma_t_min": 1.0}, r"^need ma_weight >= 0, 0 < ma_t_min < 1, ma_batch >= 0; got 0\.0, 1\.0, 256$"),
    ({"ma_batch": -1}, r"^need ma_weight >= 0, 0 < ma_t_min < 1, ma_batch >= 0; got 0\.0, 0\.02, -1$"),
])
def test_ma_options_refused_by_message(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        get_method("reflow")(FlowMap(_Probe(), "velocity"), _teacher(), _cfg(**kw))


def test_ma_options_boundaries_accepted() -> None:
    for kw in ({"ma_substeps": 1, "ma_probes": 1, "ma_every": 1, "ma_exact_dim": 1}, {"ma_weight": 0.0},
               {"ma_batch": 0}, {"ma_t_min": 0.999}):
        get_method("reflow")(FlowMap(_Probe(), "velocity"), _teacher(), _cfg(**kw))


def test_score_teacher_is_frozen_and_not_a_submodule() -> None:
    m = get_method("reflow")(FlowMap(_Probe(), "velocity"), _teacher(), _cfg())
    assert m.score_teacher is None
    other = _teacher().train()
    m.set_score_teacher(other)
    assert m.score_teacher is other and not other.training
    assert not any(p.requires_grad for p in other.parameters())
    assert all(mod is not other for mod in m.modules())
    m.set_score_teacher(None)
    assert m.score_teacher is None
    net = nn.Linear(2, 2).train()
    m.set_score_teacher(net)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_pairs_taken_in_the_batch_dtype_and_unconditional_for_an_unconditional_student() -> None:
    """An unconditional student of a class-conditional teacher gets unconditional pairs (labels -1)."""
    from fewstep.networks.mlp import MLP

    cls = get_method("reflow")
    m = cls(FlowMap(MLP(2, 8, 1, use_s=False), "velocity"), _teacher(),
            cls.make_config(n_pairs=16, pair_solver="euler", pair_steps=2))
    b = Batch(x1=torch.zeros(4, 2, dtype=DT), u=torch.rand(4, 8, generator=torch.Generator().manual_seed(0)))
    x1, x0, c = m.take_pairs(b)
    assert m.pairs is not None and len(m.pairs) == 16
    assert x1.dtype == x0.dtype == DT and x1.shape == (4, 2)
    assert c is not None and bool((c == -1).all())


def test_pair_solver_follows_the_config() -> None:
    cfg = _cfg(pair_solver="adaptive", pair_steps=7, pair_rtol=1e-3, pair_atol=1e-4)
    m = get_method("reflow")(FlowMap(_Probe(), "velocity"), _teacher(), cfg)
    assert (m.solver.method, m.solver.steps, m.solver.rtol, m.solver.atol) == ("adaptive", 7, 1e-3, 1e-4)


def _reflow(student: nn.Module | None = None, teacher: nn.Module | None = None, **kw: object):
    cls = get_method("reflow")
    cfg = cls.make_config(**{"n_pairs": 12, "pair_solver": "euler", "pair_steps": 2, "shard_size": 5, **kw})
    return cls(student or FlowMap(_Probe(), "velocity"), teacher or _teacher(), cfg)


def test_prepare_caches_pairs_in_the_run_folder_with_the_config(tmp_path) -> None:
    """Pairs land in <run_dir>/pairs (or pair_dir) with a manifest naming seed, guidance, shards and teacher."""
    m = _reflow(pair_seed=3, guidance=2.0)
    m.prepare({"run_dir": str(tmp_path), "progress": False})
    man = m.pairs.manifest
    assert (tmp_path / "pairs" / "manifest.json").exists() and len(m.pairs) == 12
    assert (man["seed"], man["guidance"], man["shard_size"], man["n"]) == (3, 2.0, 5, 12)
    assert man["teacher"]["sha256"] and man["event_shape"] == [2] and man["solver"]["steps"] == 2
    other = _reflow(pair_seed=4, pair_dir=str(tmp_path / "mine"))
    other.prepare({"run_dir": str(tmp_path / "ignored"), "progress": False})
    assert (tmp_path / "mine" / "manifest.json").exists() and not (tmp_path / "ignored").exists()
    assert float((other.pairs.x1 - m.pairs.x1).abs().max()) > 0.1  # the seed sets the noise
    again = _reflow(pair_seed=3, guidance=2.0)
    again.prepare({"run_dir": str(tmp_path), "rank": 1, "progress": False})  # another rank loads the cache
    assert again.pairs is not None and torch.equal(again.pairs.x1, m.pairs.x1)


def test_prepare_refuses_stale_pairs_unless_allowed(tmp_path) -> None:
    _reflow().prepare({"run_dir": str(tmp_path), "progress": False})
    with pytest.raises(Exception, match=r"do not match the requested teacher/solver"):
        _reflow(pair_steps=3).prepare({"run_dir": str(tmp_path), "progress": False})
    m = _reflow(pair_steps=3, allow_stale_pairs=True)
    m.prepare({"run_dir": str(tmp_path), "progress": False})
    assert m.pairs is not None and len(m.pairs) == 12


def test_prepare_shows_progress_on_rank_zero_only(tmp_path, capfd) -> None:
    for i, (ctx, shown) in enumerate((({}, True), ({"progress": True, "rank": 0}, True), ({"progress": False}, False),
                                      ({"progress": True, "rank": 1}, False))):
        capfd.readouterr()
        _reflow().prepare({"run_dir": str(tmp_path / str(i)), **ctx})
        assert ("reflow pairs" in capfd.readouterr().err) == shown, ctx
    capfd.readouterr()
    _reflow().prepare({})  # in memory, progress bar by default
    assert "reflow pairs" in capfd.readouterr().err


def test_pair_labels_follow_the_student() -> None:
    """A conditional student keeps the teacher's labels; a student net without num_classes gets labels -1."""
    from fewstep.networks.mlp import MLP

    cond_student = FlowMap(MLP(2, 8, 1, use_s=False, num_classes=2), "velocity")
    m = _reflow(cond_student)
    m.prepare({"progress": False})
    assert bool((m.pairs.cond >= 0).all())
    bare = _reflow()  # the probe network has no num_classes attribute
    bare.prepare({"progress": False})
    assert bool((bare.pairs.cond == -1).all())


class _Mix(nn.Module):
    """A velocity flow map u(x) = M x with a non-symmetric M, so a Hutchinson estimate depends on its probes."""

    parameterization = "velocity"

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.tensor([[0.9, 0.8], [-0.6, 0.6]], dtype=DT))

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return x @ self.m.T

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        return x - (t - s)[:, None] * self.velocity(x, t)


@pytest.mark.parametrize(("kw", "ref"), [({"ma_mode": "hutchinson", "ma_probes": 2}, {"mode": "hutchinson",
                                                                                      "num_probes": 2}),
                                         ({"ma_mode": "ode", "ma_exact_dim": 1}, {"mode": "ode", "exact_dim": 1})])
def test_ma_term_passes_probes_and_exact_dim(kw: dict, ref: dict) -> None:
    st, t = _Mix(), _teacher()
    x, cond = _x()
    torch.manual_seed(0)
    term, _ = ma_term(st, t, _cfg(ma_weight=1.0, ma_batch=0, **kw), x, 0.8, 0.3, cond, 0)
    torch.manual_seed(0)
    torch.testing.assert_close(term, ma_loss(st, t, x, 0.8, 0.3, cond, **ref).loss)
    torch.manual_seed(0)
    other = ma_loss(st, t, x, 0.8, 0.3, cond, mode="exact" if "exact_dim" in ref else "hutchinson").loss
    assert abs(float(term - other)) > 1e-6  # the option matters for this student


def test_non_module_score_teacher_is_stored_as_is(tmp_path) -> None:
    m = _reflow()
    target = _teacher().velocity  # a bound method: not an nn.Module, nothing to freeze
    m.set_score_teacher(target)
    assert m.score_teacher == target
    # another rank reuses a stale cache when allowed
    _reflow().prepare({"run_dir": str(tmp_path), "progress": False})
    late = _reflow(pair_steps=3, allow_stale_pairs=True)
    late.prepare({"run_dir": str(tmp_path), "rank": 1, "progress": False})
    assert late.pairs is not None and len(late.pairs) == 12
