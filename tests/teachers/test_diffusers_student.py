"""Students built from a diffusers teacher: start as the teacher's velocity, gap embeddings, JVP, folding."""

from __future__ import annotations

import pytest
import torch

from _diffusers_fixtures import save_flux_folder, save_sd3_folder, save_unet_folder
from fewstep.core.jvp import jvp
from fewstep.integrations.diffusers import ConditionTable, DiffusersTeacher
from fewstep.integrations.diffusers.student import student_from_teacher


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd3_teacher(tmp_path_factory):
    folder, cond = save_sd3_folder(tmp_path_factory.mktemp("sd3"))
    teacher = DiffusersTeacher.from_pretrained(folder)
    teacher.attach_conditioning(ConditionTable.load(cond)[0])
    return teacher


def _perturb_gaps(student, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gap in student.net.gaps.values():
            gap.linear_2.weight.copy_(0.1 * torch.randn(gap.linear_2.weight.shape, generator=g))


@pytest.mark.parametrize("param", ["average_velocity", "consistency", "velocity"])
def test_student_starts_as_teacher_velocity(sd3_teacher, param):
    f = student_from_teacher(sd3_teacher, param)
    assert (len(f.net.gaps) > 0) == (param == "average_velocity")
    assert f.net.event_shape == (4, 8, 8) and f.net.num_classes == 6
    x, c = torch.randn(3, 4, 8, 8), torch.tensor([0, 4, -1])
    t, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.3, 0.0])
    with torch.no_grad():
        torch.testing.assert_close(f.F(x, t, s, c), sd3_teacher.velocity(x, t, c), rtol=0, atol=0)
        torch.testing.assert_close(f(x, t, s, c), x - (t - s).view(-1, 1, 1, 1) * sd3_teacher.velocity(x, t, c))
    assert all(p.requires_grad for p in f.parameters())
    assert all(not p.requires_grad for p in sd3_teacher.parameters())


def test_gap_embedding_makes_F_depend_on_s_and_folds_into_the_bias(sd3_teacher):
    f = student_from_teacher(sd3_teacher, "average_velocity")
    _perturb_gaps(f)
    x, c, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.ones(2)
    with torch.no_grad():
        a, b = f.F(x, t, torch.zeros(2), c), f.F(x, t, torch.full((2,), 0.5), c)
        assert (a - b).abs().max() > 1e-3
        off = f.net.fold_gap(1.0)  # the plain model now computes F(x, t, t - 1)
        folded = f.net.denoiser.velocity(x, t, c)
        f.net.unfold_gap(off)
        torch.testing.assert_close(folded, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f.F(x, t, torch.zeros(2), c), a)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
@pytest.mark.parametrize("which", ["sd3", "unet", "flux"])
def test_forward_mode_jvp_through_diffusers_models(sd3_teacher, tmp_path, which):
    """torch.func.jvp (tangent (v, 1, 0) on (x, t, s)) equals the double-backward JVP through attention, GroupNorm
    (U-Net), the VP time map and Flux's packing / rotary embeddings."""
    if which == "sd3":
        teacher = sd3_teacher
    elif which == "unet":
        teacher = DiffusersTeacher.from_pretrained(save_unet_folder(tmp_path))
    else:
        teacher = DiffusersTeacher.from_pretrained(save_flux_folder(tmp_path), event_shape=(4, 8, 8),
                                                   embedded_guidance=3.5)
        teacher.attach_conditioning(ConditionTable({"encoder_hidden_states": torch.randn(4, 5, 16),
                                                    "pooled_projections": torch.randn(4, 8)}))
    f = student_from_teacher(teacher, "average_velocity")
    _perturb_gaps(f, 1)
    n = 2
    x = torch.randn(n, *teacher.event_shape)
    c = None if which == "unet" else torch.tensor([0, 3])
    t, s = torch.tensor([0.8, 0.4]), torch.tensor([0.3, 0.0])
    v = torch.randn_like(x)

    def fn(x, t, s):
        return f.F(x, t, s, c)

    prim, tan = (x, t, s), (v, torch.ones(n), torch.zeros(n))
    out_f, tan_f = jvp(fn, prim, tan, mode="func")
    out_a, tan_a = jvp(fn, prim, tan, mode="autograd")
    torch.testing.assert_close(out_f, out_a)
    assert tan_f.abs().max() > 1.0
    torch.testing.assert_close(tan_f, tan_a, rtol=1e-4, atol=1e-3)


def test_student_of_a_non_diffusers_teacher_is_refused():
    from fewstep.teachers.presets import load_preset

    with pytest.raises(ValueError, match="needs a diffusers teacher"):
        student_from_teacher(load_preset("ring8"))
