"""sCM: vanishing loss for the exact consistency model, warm-up, normalisation, MeanFlow(s=0) limit, weighting."""

from __future__ import annotations

import pytest
import torch

from _fixtures import exact_student, make_batch, train_and_measure
from fewstep.core.flowmap import FlowMap
from fewstep.core.jvp import jvp
from fewstep.core.timesteps import sample_time
from fewstep.methods.scm import SCM, TimeWeighting
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _cfg(**kw: object) -> object:
    base = dict(jvp_mode="fd", t_min=0.2, t_max=0.9, time_sampler="uniform", warmup_steps=0)
    base.update(kw)
    return SCM.make_config(**base)


@pytest.mark.parametrize("preset", ["ring8", "aniso3"])
def test_exact_consistency_model_loss_vanishes(preset: str) -> None:
    """F(x,t,0) = (x - Phi_{t->0}(x))/t makes df/dt = 0, so g = 0 and the target is F itself."""
    teacher = load_preset(preset).double()
    batch = make_batch(teacher, 10, seed=6)
    loss, logs = SCM(exact_student(teacher, "consistency"), teacher, _cfg()).loss("student", batch, 0)
    assert float(loss) < 1e-6 and logs["tangent_norm"] < 2e-4  # |g| ~ solver/fd error; loss ~ (|g|/0.1)^2
    bad, _ = SCM(exact_student(teacher, "consistency", offset=0.05), teacher, _cfg()).loss("student", batch, 0)
    assert float(bad) > 1e-2


def test_warmup_start_is_flow_matching_towards_v() -> None:
    """At step 0 (r = 0) g = F - v: the exact student is pulled towards v by |g|/(|g|+c) per sample."""
    teacher = load_preset("aniso3").double()
    batch = make_batch(teacher, 8, seed=7)
    method = SCM(exact_student(teacher, "consistency"), teacher, _cfg(warmup_steps=100))
    loss, logs = method.loss("student", batch, 0)
    t = sample_time(batch.u[:, 0], "uniform", 0.2, 0.9)
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    g = method.student.F(x_t, t, 0.0) - teacher.velocity(x_t, t)
    gn = g.norm(dim=1)
    assert abs(float(loss) - float((gn / (gn + 0.1)).pow(2).mean())) < 1e-8
    assert logs["warmup_r"] == 0.0
    _, logs_half = method.loss("student", batch, 50)
    assert logs_half["warmup_r"] == 0.5


def test_unnormalised_target_is_meanflow_with_s_zero() -> None:
    """c = 0, r = 1: F_tgt = v - t dF/dt, the MeanFlow target at s = 0 (checked on an MLP with func JVP)."""
    teacher = load_preset("aniso3").double()
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=32, depth=2, use_s=False), "consistency").double()
    method = SCM(student, teacher, SCM.make_config(tangent_norm_c=0.0, warmup_steps=0))
    batch = make_batch(teacher, 32, seed=8)
    loss, _ = method.loss("student", batch, 10)
    cfg = method.config
    t = sample_time(batch.u[:, 0], cfg.time_sampler, cfg.t_min, cfg.t_max, cfg.logit_mean, cfg.logit_std)
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    v = teacher.velocity(x_t, t)
    fn = lambda x, tt: student.net(x, tt, torch.zeros_like(tt))  # noqa: E731
    F, dF = jvp(fn, (x_t, t), (v, torch.ones_like(t)))
    target = v - t[:, None] * dF
    assert abs(float(loss) - float(((F - target) ** 2).sum(1).mean())) < 1e-10


def test_learned_weighting_converges_to_minus_log_error() -> None:
    """min_w E[e^w ebar - w] has w* = -log(ebar): the weighting net learns it from cached errors."""
    teacher = load_preset("ring8").double()
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=16, depth=1, use_s=False), "consistency").double()
    method = SCM(student, teacher, SCM.make_config(weighting="learned"))
    assert method.schedule(0) == ["student", "weighting"] and set(method.trainable()) == {"student", "weighting"}
    with pytest.raises(ValueError, match="student loss evaluated first"):
        method.loss("weighting", make_batch(teacher, 8, 0), 0)
    method.loss("student", make_batch(teacher, 64, seed=9), 0)
    t = torch.linspace(0.1, 0.9, 64, dtype=torch.float64)
    method._cache = (t, torch.full_like(t, 0.25))  # a known per-dimension error
    opt = torch.optim.Adam(method.weight_net.parameters(), lr=0.05)
    for _ in range(300):
        loss, _ = method.loss("weighting", make_batch(teacher, 8, 0), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = method.weight_net(t.float()).detach()
    err = (w - torch.log(torch.tensor(4.0))).abs()
    assert float(err.mean()) < 0.04 and float(err.max()) < 0.1
    assert isinstance(method.weight_net, TimeWeighting)


def test_consistency_error_falls() -> None:
    """The distance of F(x,t,0) from the exact consistency map falls on a Gaussian teacher.

    The normalised loss |g|/(|g|+c) stays near 1 at this budget (the tangent norm is still O(1)), so the
    measured quantity is the error against the exact map, not the loss value.
    """
    before, after, first, last = train_and_measure("scm", warmup_steps=20)
    assert after < 0.6 * before
    assert last["warmup_r"] == 1.0 and first["warmup_r"] < 0.3


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="t_min > 0"):
        SCM.make_config(t_min=0.0)
    with pytest.raises(ValueError, match="weighting"):
        SCM.make_config(weighting="edm")
    with pytest.raises(ValueError, match="unknown network"):
        teacher = load_preset("ring8")
        SCM(FlowMap(MLP(2, use_s=False), "consistency"), teacher).loss("fake", make_batch(teacher, 4, 0), 0)


def test_t_one_fraction_puts_that_share_of_rows_at_t_max() -> None:
    """consistency_time: rows with u[:,3] < q sit at t_max exactly, the rest follow the base sampler."""
    from fewstep.methods._shared.flowmap_helpers import consistency_time

    g = torch.Generator().manual_seed(3)
    u = torch.rand(20000, 8, generator=g)
    cfg = SCM.make_config(time_sampler="logit_normal", logit_mean=-0.4, logit_std=1.0, t_min=1e-3, t_one_fraction=0.2)
    t = consistency_time(u, cfg, cfg.t_one_fraction)
    at_one = t == 1.0
    assert abs(float(at_one.float().mean()) - 0.2) < 0.01
    assert torch.equal(at_one, u[:, 3] < 0.2)
    base = sample_time(u[:, 0], "logit_normal", 1e-3, 1.0, -0.4, 1.0)
    assert torch.equal(t[~at_one], base[~at_one])
    assert float((base > 0.95).float().mean()) < 2e-3  # why the point mass is needed: the base rarely nears 1
    with pytest.raises(ValueError, match="t_one_fraction"):
        SCM.make_config(t_one_fraction=1.5)
