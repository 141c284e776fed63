"""AYF EMD / LMD: vanishing losses for the exact flow map, the un-normalised limits, warm-up, training."""

from __future__ import annotations

import pytest
import torch

from _fixtures import exact_student, make_batch, train_and_measure
from fewstep.core.flowmap import FlowMap
from fewstep.core.jvp import jvp
from fewstep.methods.ayf import AYFEulerian, AYFLagrangian
from fewstep.methods.meanflow import MeanFlow
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _cfg(cls: type, **kw: object) -> object:
    base = dict(jvp_mode="fd", t_min=0.2, t_max=0.9, time_sampler="uniform", warmup_steps=0)
    base.update(kw)
    return cls.make_config(**base)


@pytest.mark.parametrize("cls", [AYFEulerian, AYFLagrangian])
@pytest.mark.parametrize("preset", ["ring8", "aniso3"])
def test_exact_flow_map_loss_vanishes(cls: type, preset: str) -> None:
    """EMD: d/dt f = 0 and LMD: d/ds f = v(f, s) hold for the exact map, so g = 0 (solver/fd accuracy)."""
    teacher = load_preset(preset).double()
    batch = make_batch(teacher, 8, seed=13)
    loss, logs = cls(exact_student(teacher), teacher, _cfg(cls)).loss("student", batch, 0)
    assert float(loss.detach()) < 1e-6 and logs["tangent_norm"] < 2e-4
    bad, _ = cls(exact_student(teacher, offset=0.05), teacher, _cfg(cls)).loss("student", batch, 0)
    assert float(bad.detach()) > 1e-2


def _small_student(seed: int = 0) -> FlowMap:
    torch.manual_seed(seed)
    return FlowMap(MLP(2, hidden=32, depth=2), "average_velocity").double()


def test_emd_without_normalisation_equals_meanflow() -> None:
    """c = 0, r = 1: F^- + (v - F^-) - (t-s) dF/dt = MeanFlow's target, so the plain-L2 losses agree."""
    teacher = load_preset("ring8").double()
    student = _small_student()
    batch = make_batch(teacher, 32, seed=14)
    emd, _ = AYFEulerian(student, teacher, AYFEulerian.make_config(tangent_norm_c=0.0, warmup_steps=0,
                                                                   equal_fraction=0.3)).loss("student", batch, 5)
    mf, _ = MeanFlow(student, teacher, MeanFlow.make_config(norm_p=0.0, equal_fraction=0.3)).loss("student", batch, 5)
    emd, mf = float(emd.detach()), float(mf.detach())
    assert abs(emd - mf) < 1e-9 * max(1.0, mf)


def test_lmd_without_normalisation_matches_lagrangian_target() -> None:
    """c = 0, r = 1: F_tgt = v(x_t - (t-s)F, s) + (t-s) dF/ds (the s-derivative of (t-s)F = int_s^t v)."""
    teacher = load_preset("aniso3").double()
    student = _small_student(1)
    cfg = AYFLagrangian.make_config(tangent_norm_c=0.0, warmup_steps=0, corner_fraction=0.2)
    batch = make_batch(teacher, 32, seed=15)
    method = AYFLagrangian(student, teacher, cfg)
    loss, _ = method.loss("student", batch, 0)
    t, s = method.sample_times(batch)
    assert bool(((t == 1) & (s == 0)).any())  # the corner rows are in the loss
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    F, dF_ds = jvp(lambda x, tt, ss: student.net(x, tt, ss), (x_t, t, s),
                   (torch.zeros_like(x_t), torch.zeros_like(t), torch.ones_like(s)))
    target = teacher.velocity(x_t - (t - s)[:, None] * F, s) + (t - s)[:, None] * dF_ds
    assert abs(float(loss.detach()) - float(((F - target) ** 2).sum(1).mean().detach())) < 1e-10


def test_warmup_and_normalisation_in_emd() -> None:
    """At r = 0 the EMD tangent is v - F^-; the normalised target moves F by |g|/(|g|+c) < 1 per row."""
    teacher = load_preset("ring8").double()
    student = _small_student(2)
    cfg = AYFEulerian.make_config(warmup_steps=10, r_max=0.99, equal_fraction=0.0)
    method = AYFEulerian(student, teacher, cfg)
    batch = make_batch(teacher, 32, seed=16)
    loss, logs = method.loss("student", batch, 0)
    t, s = method.sample_times(batch)
    x_t = (1 - t)[:, None] * batch.x0 + t[:, None] * batch.x1
    gn = (teacher.velocity(x_t, t) - student.F(x_t, t, s)).norm(dim=1)
    expected = float((gn / (gn + 0.1)).pow(2).mean().detach())
    assert abs(float(loss.detach()) - expected) < 1e-8 and float(loss.detach()) < 1.0
    assert logs["warmup_r"] == 0.0
    assert method.loss("student", batch, 5)[1]["warmup_r"] == pytest.approx(0.495)
    assert method.loss("student", batch, 50)[1]["warmup_r"] == pytest.approx(0.99)


def test_lmd_needs_a_teacher() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        AYFLagrangian(_small_student(), None, AYFLagrangian.make_config())
    with pytest.raises(ValueError, match="r_max"):
        AYFEulerian.make_config(r_max=1.5)


@pytest.mark.parametrize("name", ["ayf_emd", "ayf_lmd"])
def test_loss_falls_and_flow_map_improves(name: str) -> None:
    """Error against the exact map falls; after the warm-up (r = 1) the tangent norm falls too."""
    before, after, first, last = train_and_measure(name, warmup_steps=0)
    assert after < 0.6 * before
    assert last["tangent_norm"] < 0.8 * first["tangent_norm"]
