r"""Tests added to kill mutants of methods/dmd2.py (tools/mutation.py), its optional GAN head:
fake step :math:`L_{fake} + \lambda_D L_D(x_0^{real}, \hat x_0^S; \tau_r = U_{aux}, \tau_s = U_{corner})` on the fake
score's own anchor, student step :math:`L_{DM} + \lambda_G L_G(\hat x_0^S; \tau = U_{select})` on one anchor shared by
both terms; one optimiser for fake score and head; refusals by full message.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from _fixtures import class_batch, small_teacher, student_net
from fewstep.methods import Batch, get_method
from fewstep.methods._shared.dm import fake_score_loss, renoise_time
from fewstep.methods._shared.gan import discriminator_loss, generator_loss
from fewstep.methods.base import U_AUX, U_CORNER, U_FAKE, U_SELECT

torch.set_num_threads(1)


def _dmd2(**cfg: float) -> nn.Module:
    torch.manual_seed(0)
    cls = get_method("dmd2")
    return cls(student_net(), small_teacher(), cls.make_config(fake_updates=1, t_min=0.1, t_max=0.9, **cfg))


def _data_batch(n: int = 48, seed: int = 0) -> Batch:
    b = class_batch(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b.x0 = small_teacher().sample(n, cond=b.cond, generator=g).double()  # float64 data: cast to the samples' dtype
    return b


def test_refusals_by_message_and_boundaries() -> None:
    cls = get_method("dmd2")
    for kw, got in ((dict(gan_weight=-1.0), "-1.0, 0.01"), (dict(gan_disc_weight=-0.5), "0.0, -0.5")):
        with pytest.raises(ValueError, match="^" + re.escape(f"gan_weight and gan_disc_weight must be >= 0; got {got}")
                           + "$"):
            cls(student_net(), small_teacher(), cls.make_config(**kw))
    msg = ("the GAN head reads one fake score's features; fake_split > 1 keeps several: use fake_split = 1 with "
           "gan_weight > 0")
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        cls(student_net(), small_teacher(), cls.make_config(gan_weight=0.1, fake_split=2))
    m = _dmd2(gan_weight=0.0, gan_disc_weight=0.0)
    assert m.gan_head is None and set(m.trainable()) == {"student", "fake"} and m.trainable()["fake"] is m.fake
    assert cls.make_config().gan_weight == 0.0 and cls.make_config().gan_disc_weight == 0.01
    assert cls.uses_data(cls.make_config(gan_weight=1e-3)) and not cls.uses_data(cls.make_config())
    on = _dmd2(gan_weight=1e-3)
    tr = on.trainable()
    assert set(tr) == {"student", "fake"} and tr["student"] is on.student
    assert isinstance(tr["fake"], nn.ModuleList) and tr["fake"][0] is on.fake and tr["fake"][1] is on.gan_head


def test_fake_step_is_fake_fm_plus_weighted_discriminator_on_the_given_anchor() -> None:
    m = _dmd2(gan_weight=0.1, gan_disc_weight=0.7)
    b = _data_batch()
    a0 = m.fake_anchor(b)
    a = dataclasses.replace(a0, x0=a0.x0 + 0.25)  # a passed anchor differs from the one the method would draw
    torch.manual_seed(5)
    loss, logs = m.fake_loss(b, a)
    cfg = m.config
    torch.manual_seed(5)
    fm = fake_score_loss(m.fake, a.x0, renoise_time(b.u[:, U_FAKE], "uniform", t_min=0.1, t_max=0.9),
                         torch.randn_like(a.x0), b.cond)
    d, d_logs = discriminator_loss(m.fake, m.gan_head, b.x0.float(), a.x0,
                                   renoise_time(b.u[:, U_AUX], "uniform", t_min=0.1, t_max=0.9),
                                   renoise_time(b.u[:, U_CORNER], "uniform", t_min=0.1, t_max=0.9), b.cond)
    assert cfg.gan_disc_weight == 0.7
    torch.testing.assert_close(loss, fm + 0.7 * d)
    assert logs["fake_loss"] == pytest.approx(float(fm), rel=1e-6)
    assert {k: logs[k] for k in d_logs} == pytest.approx(d_logs, rel=1e-6)
    torch.manual_seed(5)
    default, _ = m.fake_loss(b)
    torch.manual_seed(5)
    at_a0, _ = m.fake_loss(b, a0)
    torch.testing.assert_close(default, at_a0)  # the default anchor is fake_anchor's
    assert abs(float(default) - float(loss)) > 1e-4
    msg = "dmd2 with gan_weight > 0 needs real data batches x0 (data.name: a dataset or teacher)"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        m.fake_loss(class_batch())


def test_student_step_is_dm_plus_weighted_generator_term_on_one_anchor() -> None:
    m = _dmd2(gan_weight=0.3)
    b = _data_batch()
    torch.manual_seed(8)
    loss, logs = m.student_loss(b, 0)
    torch.manual_seed(8)
    a = m.anchor(b, grad=True)
    dm, _ = m.dm_student_loss(b, a)
    g = generator_loss(m.fake, m.gan_head, a.x0, renoise_time(b.u[:, U_SELECT], "uniform", t_min=0.1, t_max=0.9),
                       b.cond)
    torch.testing.assert_close(loss, dm + 0.3 * g)
    assert logs["gan_g"] == pytest.approx(float(g), rel=1e-6)
    assert logs["loss"] == pytest.approx(float(dm + 0.3 * g), rel=1e-6)
    assert logs["dm_loss"] == pytest.approx(float(dm), rel=1e-6)
    off = _dmd2()
    torch.manual_seed(8)
    l0, logs0 = off.student_loss(b, 0)
    assert "gan_g" not in logs0 and logs0["loss"] == pytest.approx(float(l0), rel=1e-9)


def test_student_step_simulates_one_anchor_for_both_terms() -> None:
    """The DM and GAN terms share the anchor: one backward simulation (n_steps student evaluations) per student
    step, as many as ``anchor`` alone takes."""
    m = _dmd2(gan_weight=0.3, n_steps=3)
    b = _data_batch()
    calls = []
    h = m.student.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        m.anchor(b, grad=True)
        one = len(calls)
        calls.clear()
        m.student_loss(b, 0)
    finally:
        h.remove()
    assert one >= 1 and len(calls) == one
