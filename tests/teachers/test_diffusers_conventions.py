"""The diffusers adapter's time conventions: its Euler solve equals diffusers' own scheduler loops on the same noise."""

from __future__ import annotations

import pytest
import torch

import _diffusers_fixtures as fx
from fewstep.integrations.diffusers import ConditionTable, DiffusersTeacher, VPConvention
from fewstep.sampling.samplers import solve


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _flow_reference(model, sched, x, ehs, pool, guidance, null_ehs, null_pool):
    """SD3 pipeline's denoising loop (CFG on the model output), FlowMatchEulerDiscreteScheduler.step."""
    for t in sched.timesteps:
        ts = t.expand(x.shape[0])
        out = model(x, encoder_hidden_states=ehs, pooled_projections=pool, timestep=ts).sample
        if guidance != 1.0:
            out_u = model(x, encoder_hidden_states=null_ehs, pooled_projections=null_pool, timestep=ts).sample
            out = out_u + guidance * (out - out_u)
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_matching_euler_equals_scheduler_loop(tmp_path, guidance):
    folder, cond_dir = fx.save_sd3_folder(tmp_path, shift=3.0)
    teacher = DiffusersTeacher.from_pretrained(folder)
    table, _ = ConditionTable.load(cond_dir)
    teacher.attach_conditioning(table)
    assert teacher.event_shape == (4, 8, 8) and teacher.num_classes == 6
    ids = torch.tensor([0, 3, 5])
    x1 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = teacher.sampling_grid(6)
    assert grid[0] == pytest.approx(1.0) and grid[-1] == 0.0
    assert grid[1] != pytest.approx(5 / 6, abs=1e-3)  # the shift moved the grid
    with torch.no_grad():
        ours = solve(teacher.velocity, x1, grid, cond=ids, guidance=guidance).x
        sched = fx.diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        sched.set_timesteps(6)
        rows = table.rows(ids, torch.device("cpu"), torch.float32)
        null = table.rows(torch.full((3,), -1), torch.device("cpu"), torch.float32)
        ref = _flow_reference(teacher.model, sched, x1.clone(), rows["encoder_hidden_states"],
                              rows["pooled_projections"], guidance, null["encoder_hidden_states"],
                              null["pooled_projections"])
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_flux_packed_guidance_distilled_euler_equals_scheduler_loop(tmp_path):
    """Flux: timestep = sigma (x1000 inside), 2x2 packing, position ids, embedded guidance, dynamic shift mu."""
    folder = fx.save_flux_folder(tmp_path)
    with pytest.raises(ValueError, match="embedded_guidance"):
        DiffusersTeacher.from_pretrained(folder, event_shape=(4, 8, 8))
    teacher = DiffusersTeacher.from_pretrained(folder, event_shape=(4, 8, 8), embedded_guidance=3.5)
    g = torch.Generator().manual_seed(4)
    ehs, pool = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    teacher.attach_conditioning(ConditionTable({"encoder_hidden_states": ehs, "pooled_projections": pool}))
    x1 = torch.randn(2, 4, 8, 8, generator=g)
    grid = teacher.sampling_grid(4, mu=0.8)
    sched = fx.diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(4, mu=0.8)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1] += torch.arange(4)[:, None]
    ids[..., 2] += torch.arange(4)[None, :]
    x = x1.view(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 16)  # FluxPipeline._pack_latents
    with torch.no_grad():
        ours = solve(teacher.velocity, x1, grid, cond=torch.tensor([0, 1])).x
        for t in sched.timesteps:
            out = teacher.model(x, timestep=t.expand(2) / 1000, guidance=torch.full((2,), 3.5), pooled_projections=pool,
                                encoder_hidden_states=ehs, txt_ids=torch.zeros(5, 3), img_ids=ids.reshape(-1, 3)).sample
            x = sched.step(out, t, x).prev_sample
    ref = x.view(2, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 8, 8)  # _unpack_latents
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _ddim_loop(model, sched, z, guidance=1.0, labels=None, null=None):
    for k in sched.timesteps:
        kw = {} if labels is None else {"class_labels": labels}
        out = model(z, k.expand(z.shape[0]), **kw, return_dict=False)[0][:, : z.shape[1]]
        if guidance != 1.0:
            out_u = model(z, k.expand(z.shape[0]), class_labels=torch.full_like(labels, null),
                          return_dict=False)[0][:, : z.shape[1]]
            out = out_u + guidance * (out - out_u)
        z = sched.step(out, k, z, eta=0.0).prev_sample
    return z


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_unet_euler_equals_ddim(tmp_path, prediction_type):
    """DDIM (eta = 0) on a DDPM schedule = Euler on the linear path at t = tau_k, with x = z / (a_k + b_k)."""
    teacher = DiffusersTeacher.from_pretrained(fx.save_unet_folder(tmp_path, prediction_type))
    conv = teacher.convention
    assert isinstance(conv, VPConvention) and teacher.num_classes is None
    ddim = fx.diffusers.DDIMScheduler.from_config(teacher.scheduler.config)
    ddim.set_timesteps(8)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    grid = conv.grid(ddim.timesteps)
    t0 = torch.tensor(grid[0])
    x = z * torch.sqrt((1 - t0) ** 2 + t0 ** 2)
    with torch.no_grad():
        ours = solve(teacher.velocity, x, grid).x
        ref = _ddim_loop(teacher.model, ddim, z.clone())
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_dit_class_conditional_guided_euler_equals_ddim(tmp_path):
    """DiT: labels pass through, -1 -> the class-dropout token, CFG on epsilon = CFG on the velocity."""
    teacher = DiffusersTeacher.from_pretrained(fx.save_dit_folder(tmp_path))
    assert teacher.num_classes == 10
    ddim = fx.diffusers.DDIMScheduler.from_config(teacher.scheduler.config)
    ddim.set_timesteps(5)
    labels = torch.tensor([1, 7])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    grid = teacher.convention.grid(ddim.timesteps)
    t0 = torch.tensor(grid[0])
    with torch.no_grad():
        ours = solve(teacher.velocity, z * torch.sqrt((1 - t0) ** 2 + t0 ** 2), grid, cond=labels, guidance=2.5).x
        ref = _ddim_loop(teacher.model, ddim, z.clone(), 2.5, labels, null=10)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_vp_time_map_is_exact_at_steps_and_differentiable():
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    conv = VPConvention(ab, "epsilon")
    ks = torch.tensor([0, 1, 250, 999])
    t = conv.step_time(ks).float()
    assert torch.equal(conv.timestep(t), ks.float())
    assert conv.t_min == pytest.approx(0.00990, abs=1e-4) and conv.t_max == pytest.approx(0.99369, abs=1e-4)
    mid = (conv.step_time(10) + conv.step_time(11)) / 2
    assert 10.0 < float(conv.timestep(mid.reshape(1))) < 11.0
    _, dk = torch.func.jvp(conv.timestep, (torch.tensor([0.3, 0.6]),), (torch.ones(2),))
    assert bool((dk > 100).all())  # k(t) increases by ~10^3 per unit t
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    tt = torch.tensor([0.3, 0.6])
    torch.testing.assert_close(conv.to_velocity(conv.to_model_output(v, x, tt), x, tt), v, rtol=1e-5, atol=1e-5)


def test_bad_folders_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        DiffusersTeacher.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no diffusers model"):
        DiffusersTeacher.from_pretrained(tmp_path / "empty")
    fx.tiny_sd3().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no scheduler config"):
        DiffusersTeacher.from_pretrained(tmp_path / "bare")
    folder, _ = fx.save_sd3_folder(tmp_path)
    teacher = DiffusersTeacher.from_pretrained(folder)
    with pytest.raises(ValueError, match="text-conditional"):
        teacher.velocity(torch.randn(1, 4, 8, 8), 0.5)
    with pytest.raises(ValueError, match="unknown teacher dtype"):
        DiffusersTeacher.from_pretrained(folder, dtype="int8")
