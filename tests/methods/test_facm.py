"""FACM: vanishing CM + FM loss for the exact student, the anchor realisations, the relaxed target."""

from __future__ import annotations

import math

import pytest
import torch

from _fixtures import exact_student, make_batch, train_and_measure
from fewstep.core.flowmap import FlowMap
from fewstep.core.jvp import jvp
from fewstep.core.timesteps import sample_time
from fewstep.methods.facm import FACM
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


@pytest.mark.parametrize("preset", ["ring8", "aniso3"])
def test_exact_student_loss_vanishes(preset: str) -> None:
    """Exact CM branch (g = 0) and exact FM branch F(x,t,t) = v: both parts vanish."""
    teacher = load_preset(preset).double()
    cfg = FACM.make_config(jvp_mode="fd", t_min=0.2, t_max=0.9, time_sampler="uniform")
    batch = make_batch(teacher, 10, seed=11)
    method = FACM(exact_student(teacher, "consistency"), teacher, cfg)
    assert method.anchor_mode == "h0"
    loss, logs = method.loss("student", batch, 0)
    assert float(loss.detach()) < 1e-7 and logs["fm"] < 1e-12 and logs["cm_mse"] < 1e-9
    bad, bad_logs = FACM(exact_student(teacher, "consistency", offset=0.05), teacher, cfg).loss("student", batch, 0)
    assert bad_logs["fm_mse"] == pytest.approx(0.05**2, rel=1e-6) and float(bad.detach()) > 1e-3


def test_anchor_realisations() -> None:
    """negative_time evaluates the backbone at -t (FACM's mirrored interval); h0 needs a backbone with s."""
    torch.manual_seed(0)
    no_s = FlowMap(MLP(2, hidden=16, depth=1, use_s=False), "consistency").double()
    m = FACM(no_s, None, FACM.make_config())
    assert m.anchor_mode == "negative_time"
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    assert torch.allclose(m.anchor(x, t, None), no_s.net(x, -t, -t), atol=0)
    assert float((m.anchor(x, t, None) - no_s.F(x, t, 0.0)).abs().max().detach()) > 1e-4  # a distinct branch
    zero = torch.zeros(4, dtype=torch.float64)
    assert torch.allclose(m.anchor(x, zero, None), no_s.F(x, zero, 0.0), atol=1e-12)  # glued at t = 0
    with_s = FlowMap(MLP(2, hidden=16, depth=1, use_s=True), "consistency").double()
    m2 = FACM(with_s, None, FACM.make_config())
    assert m2.anchor_mode == "h0" and torch.allclose(m2.anchor(x, t, None), with_s.net(x, t, t), atol=0)
    with pytest.raises(ValueError, match="use_s=True"):
        FACM(no_s, None, FACM.make_config(anchor="h0"))


def test_loss_matches_the_formula_with_relaxation_and_clip() -> None:
    """L = sin(pi t/2) e/sg(sqrt(e+c)) + mse + 1 - cos, target F - (1-(1-t)^p) clip(g, -1, 1)."""
    teacher = load_preset("aniso3").double()
    torch.manual_seed(1)
    student = FlowMap(MLP(2, hidden=32, depth=2, use_s=False), "consistency").double()
    cfg = FACM.make_config(cond_drop=0.0)
    method = FACM(student, teacher, cfg)
    batch = make_batch(teacher, 32, seed=12)
    loss, logs = method.loss("student", batch, 0)
    t = sample_time(batch.u[:, 0], cfg.time_sampler, cfg.t_min, cfg.t_max, cfg.logit_mean, cfg.logit_std)
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    v = teacher.velocity(x_t, t)
    F, dF = jvp(lambda x, tt: student.net(x, tt, torch.zeros_like(tt)), (x_t, t), (v, torch.ones_like(t)))
    g = F - (v - t[:, None] * dF)
    assert float(g.abs().max().detach()) > 1.0  # the clip is active somewhere at initialisation
    target = F - (1 - (1 - t).sqrt())[:, None] * g.clamp(-1, 1)
    e = ((F - target) ** 2).mean(1)
    cm = torch.sin(math.pi * t / 2) * e / (e + 1e-3).sqrt()
    fm_pred = student.net(x_t, -t, -t)
    fm = ((fm_pred - v) ** 2).mean(1) + 1 - torch.nn.functional.cosine_similarity(fm_pred, v, dim=1)
    assert abs(float(loss.detach()) - float((cm.mean() + fm.mean()).detach())) < 1e-10
    assert abs(logs["cm"] - float(cm.mean().detach())) < 1e-10


def test_loss_falls_and_consistency_improves() -> None:
    before, after, first, last = train_and_measure("facm")
    assert after < 0.6 * before
    assert last["loss"] < 0.5 * first["loss"] and last["fm"] < 0.5 * first["fm"]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="anchor"):
        FACM.make_config(anchor="expanded")
    with pytest.raises(ValueError, match="t_min > 0"):
        FACM.make_config(t_min=0.0)
    with pytest.raises(ValueError, match="alpha_p"):
        FACM.make_config(alpha_p=0.0)



def test_t_one_fraction_rows_train_the_one_step_jump() -> None:
    """FACM draws its times with consistency_time: a share t_one_fraction of the rows sits at t = 1 exactly."""
    teacher = load_preset("ring8").double()
    batch = make_batch(teacher, 4000, seed=4)
    with pytest.raises(ValueError, match="t_one_fraction"):
        FACM.make_config(t_one_fraction=2.0)
    seen: list[torch.Tensor] = []
    for q in (0.0, 0.25):
        student = FlowMap(MLP(2, hidden=16, depth=1, use_s=False), "consistency").double()
        method = FACM(student, teacher, FACM.make_config(t_one_fraction=q))
        inner = method.student_jvp
        method.student_jvp = lambda x, t, s, tan, c, f=inner: (seen.append(t.detach()), f(x, t, s, tan, c))[1]
        loss, _ = method.loss("student", batch, 0)
        assert torch.isfinite(loss)
    assert float((seen[0] == 1.0).float().mean()) < 1e-3
    assert abs(float((seen[1] == 1.0).float().mean()) - 0.25) < 0.02
    assert torch.equal(seen[1] == 1.0, batch.u[:, 3] < 0.25)
