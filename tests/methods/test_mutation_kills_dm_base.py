r"""Tests added to kill mutants of methods/_shared/dm_base.py (tools/mutation.py) left by ``fake_split``,
``fake_samples: auto`` and the anchor argument of the DM losses (DMD2's GAN head shares one anchor):
:math:`L_{DM} = \tfrac12\,\mathrm{mean}(\hat x_0^S - sg(\hat x_0^S - g))^2`, :math:`g = (\hat x_0^f - \hat x_0^r)/n`
at the anchor the caller passes, each row scored by the fake-score copy of its anchor bin; refusals by full message.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from _fixtures import class_batch, ring_teacher, spread_split_fake
from _fixtures import student_net as _student_net
from fewstep.methods import get_method
from fewstep.methods._shared.dm import dm_loss, fake_x0, renoise, renoise_time, teacher_x0
from fewstep.methods._shared.split_fake import SplitFake, fake_bin
from fewstep.methods.base import U_S

torch.set_num_threads(1)


def _dmd(**kw: object) -> torch.nn.Module:
    cls = get_method("dmd")
    torch.manual_seed(11)
    return spread_split_fake(cls(_student_net(param="velocity"), ring_teacher(), cls.make_config(**kw)))


def test_auto_fake_samples_of_the_plain_dm_base_is_anchor() -> None:
    """The DM base's rule: ``auto`` resolves to ``anchor``, so fake_split > 1 builds the split fake."""
    m = _dmd(fake_samples="auto", n_steps=2, fake_split=2)
    assert m.auto_fake_samples() == "anchor" and m.fake_samples == "anchor"
    assert isinstance(m.fake, SplitFake) and len(m.fake.copies) == 2
    assert _dmd(fake_samples="final", n_steps=2, fake_split=2).fake_samples == "final"


def test_fake_split_with_fake_ema_is_refused_by_message() -> None:
    msg = ("fake_split > 1 fits each copy to its own anchor bin; a fake_ema merge of the student into every copy "
           "is not defined: use fake_ema = 0")
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        _dmd(fake_split=2, fake_ema=0.5)
    with pytest.raises(ValueError, match="^" + re.escape("fake_split must be >= 1; got 0") + "$"):
        _dmd(fake_split=0)


@pytest.mark.parametrize("split", [1, 3])
def test_dm_student_loss_at_the_given_anchor_is_the_equation(split: int) -> None:
    """A passed anchor (here a fresh one shifted by 0.3, so it differs from the one the method would draw) is the
    one the loss acts on; the real teacher is guided by w; row i's fake x0 comes from the copy of its bin."""
    m = _dmd(n_steps=3, fake_split=split, guidance=2.0, norm_floor=0.05)
    b = class_batch(96, seed=2)
    a0 = m.anchor(b, grad=True)
    a = dataclasses.replace(a0, x0=a0.x0 + 0.3)
    torch.manual_seed(4)
    loss, logs = m.dm_student_loss(b, a)
    tau = renoise_time(b.u[:, U_S], "uniform", t_min=m.config.t_min, t_max=m.config.t_max)
    torch.manual_seed(4)
    x_tau = renoise(a.x0.detach(), tau, torch.randn_like(a.x0))
    x0_real = teacher_x0(m.teacher, x_tau, tau, b.cond, 2.0)
    if split == 1:
        x0_fake = fake_x0(m.fake, x_tau, tau, b.cond)
    else:
        bins = fake_bin(a.sigma, split)
        assert len(set(bins.tolist())) == split  # every copy is used
        x0_fake = torch.zeros_like(x_tau)
        for k, c in enumerate(m.fake.copies):
            r = bins == k
            x0_fake[r] = fake_x0(c, x_tau[r], tau[r], b.cond[r])
    want, g = dm_loss(a.x0, x0_real, x0_fake, 0.05, "dmd2")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert logs["dm_grad_rms"] == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-5)
    torch.manual_seed(4)
    fresh, _ = m.dm_student_loss(b)  # without the argument: a fresh, unshifted anchor
    assert abs(float(fresh) - float(loss)) > 1e-4
