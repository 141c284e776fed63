"""`fewstep distill` with a diffusers teacher, `fewstep sample`, `fewstep export --format diffusers` and reloading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _diffusers_fixtures import diffusers, save_dit_folder, save_latents_folder, save_sd3_folder, save_unet_folder
from fewstep.cli import main
from fewstep.config.build import load_run
from fewstep.integrations.diffusers import ConditionTable
from fewstep.integrations.diffusers.export import load_exported, sample_exported
from fewstep.sampling.spec import sample_with

METHOD_CFG = {"reflow": {"n_pairs": 8, "pair_steps": 4, "pair_solver": "euler"}, "meanflow": {},
              "cd": {"n_steps": 4}, "dmd2": {"fake_updates": 1}}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_sd3_folder(tmp_path_factory.mktemp("sd3"), with_vae=True)


def _distill(tmp: Path, teacher: dict, data: dict, method: str, steps: int, student: dict | None = None) -> Path:
    cfg = {"seed": 0, "device": "cpu", "teacher": teacher, "data": data, "student": student or {"kind": "teacher"},
           "method": {"name": method, "cfg": METHOD_CFG[method]},
           "train": {"steps": steps, "batch_size": 2, "lr": 1e-4, "ema_decays": [0.9], "progress": False,
                     "tensorboard": False, "log_every": 1},
           "eval": {"nfe": []}}
    (tmp / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp / f"run-{method}"
    assert main(["distill", "--config", str(tmp / f"{method}.yaml"), "--run-dir", str(run)]) == 0
    return run


def _sd3_teacher_cfg(folder: Path, guidance: float = 2.0) -> dict:
    return {"kind": "diffusers", "path": str(folder), "guidance": guidance}


def _check_methods(sd3, tmp_path, steps, methods=tuple(METHOD_CFG)) -> dict[str, Path]:
    folder, cond = sd3
    runs = {}
    for method in methods:
        run = _distill(tmp_path, _sd3_teacher_cfg(folder, 1.0 if method == "cd" else 2.0),
                       {"name": "embeddings", "kwargs": {"path": str(cond)}}, method, steps)
        text = (run / "metrics.csv").read_text()
        assert len([r for r in text.splitlines()[1:] if r]) >= steps and "nan" not in text
        runs[method] = run
    out = tmp_path / "samples"
    assert main(["sample", str(runs[methods[0]]), "--nfe", "2", "--n", "3", "--label", "1", "--out", str(out),
                 "--decode"]) == 0
    x = torch.from_numpy(np.load(out.with_suffix(".npy")))
    assert x.shape == (3, 4, 8, 8) and bool(torch.isfinite(x).all())
    assert np.load(tmp_path / "samples-decoded.npy").shape == (3, 3, 8, 8)  # through the folder's tiny VAE
    return runs


@pytest.fixture(scope="module")
def runs(sd3, tmp_path_factory):
    """One `fewstep distill` run (2 steps) per method: reflow, meanflow, cd (teacher unguided), dmd2 (guidance 2)."""
    return _check_methods(sd3, tmp_path_factory.mktemp("runs"), steps=2)


def test_distill_reflow_meanflow_cd_dmd2_through_cli(runs):
    assert sorted(runs) == sorted(METHOD_CFG)


@pytest.mark.slow
def test_distill_20_steps_each(sd3, tmp_path):
    _check_methods(sd3, tmp_path, steps=20)


def test_export_reload_reproduces_samples_and_diffusers_euler_one_step(sd3, runs, tmp_path):
    folder, cond = sd3
    run_dir = runs["meanflow"]
    with torch.no_grad():  # make the gap embedding matter (2 training steps barely move it)
        run = load_run(run_dir)
        for gap in run.student(ema=True).net.gaps.values():
            gap.linear_2.weight.normal_(0, 0.05)
    out = tmp_path / "export"
    from fewstep.integrations.diffusers.export import export_student

    export_student(run.student(ema=True), run.teacher, out, run.sampler, nfe=2)
    assert (out / "transformer" / "config.json").is_file() and (out / "vae" / "config.json").is_file()
    table, _ = ConditionTable.load(cond)
    ids = torch.tensor([0, 2, 5])
    kw = table.rows(ids, torch.device("cpu"), torch.float32)
    x1 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    student = run.student(ema=True)
    for nfe in (1, 2):
        ref = sample_with(student, x1, run.sampler, nfe, cond=ids).x
        got = sample_exported(out, x1, cond=kw, nfe=nfe).x
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # one step with diffusers alone: the folded model + FlowMatchEulerDiscreteScheduler
    model = diffusers.SD3Transformer2DModel.from_pretrained(out / "transformer")
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    sched.set_timesteps(sigmas=[1.0])
    x = x1.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v = model(x, timestep=t.expand(3), **kw).sample
            x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(x, sample_with(student, x1, run.sampler, 1, cond=ids).x, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "fewstep_student" / "student.json").read_text())["diffusers_euler_exact"] is False


def test_consistency_student_equals_diffusers_stochastic_euler(sd3, runs, tmp_path):
    """A cd student (gamma = 1) at 2 steps = FlowMatchEuler with stochastic_sampling on the same generator."""
    folder, cond = sd3
    run_dir = runs["cd"]
    out = tmp_path / "export-cd"
    assert main(["export", str(run_dir), "--format", "diffusers", str(out), "--nfe", "2"]) == 0
    run = load_run(run_dir)
    assert run.sampler.gamma == 1.0
    kw = ConditionTable.load(cond)[0].rows(torch.tensor([1, 3]), torch.device("cpu"), torch.float32)
    x1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = sample_with(run.student(ema=True), x1, run.sampler, 2, cond=torch.tensor([1, 3]),
                      generator=torch.Generator().manual_seed(11)).x
    model = diffusers.SD3Transformer2DModel.from_pretrained(out / "transformer")
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert sched.config.stochastic_sampling
    sched.set_timesteps(sigmas=[1.0, 0.5])
    g, x = torch.Generator().manual_seed(11), x1.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, timestep=t.expand(2), **kw).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_vp_teachers_distill_and_export(tmp_path, which):
    """UNet2DModel (DDPM eps, latents as data, meanflow) and class-conditional DiT (labels only, guided dmd2)."""
    if which == "unet":
        teacher = {"kind": "diffusers", "path": str(save_unet_folder(tmp_path))}
        data = {"name": "embeddings", "kwargs": {"path": str(save_latents_folder(tmp_path / "lat", (3, 8, 8)))}}
        method, shape, cond = "meanflow", (3, 8, 8), None
    else:
        teacher = {"kind": "diffusers", "path": str(save_dit_folder(tmp_path)), "guidance": 2.0}
        data, method, shape, cond = {"name": "teacher"}, "dmd2", (4, 8, 8), torch.tensor([3, 9])
    run_dir = _distill(tmp_path, teacher, data, method, 1)
    out = tmp_path / f"export-{which}"
    assert main(["export", str(run_dir), "--format", "diffusers", str(out)]) == 0
    assert (out / ("unet" if which == "unet" else "transformer") / "config.json").is_file()
    if which == "unet":  # a pipeline folder in, a pipeline folder out (its scheduler entry now DDIM)
        pipe = diffusers.DiffusionPipeline.from_pretrained(out)
        assert type(pipe).__name__ == "DDPMPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
        img = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
        assert img.shape == (1, 8, 8, 3)
    run = load_run(run_dir)
    x1 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    flowmap, meta = load_exported(out)
    assert meta["diffusers_euler_exact"] is False  # VP teachers: sample with sample_exported
    torch.testing.assert_close(sample_with(flowmap, x1, run.sampler, 2, cond=cond).x,
                               sample_with(run.student(ema=True), x1, run.sampler, 2, cond=cond).x,
                               rtol=1e-5, atol=1e-5)


def test_config_errors_are_one_line(sd3, tmp_path, capsys):
    folder, cond = sd3
    cfg = {"teacher": {"kind": "diffusers", "path": str(folder), "kwargs": {"dtyp": "bf16"}},
           "data": {"name": "embeddings", "kwargs": {"path": str(cond)}}, "student": {"kind": "teacher"},
           "method": {"name": "meanflow"}, "train": {"steps": 1, "batch_size": 2}}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(p), "--run-dir", str(tmp_path / "r1")]) == 2
    assert "unknown option(s) ['dtyp'] in teacher.kwargs" in capsys.readouterr().err
    cfg["teacher"]["kwargs"] = {}
    cfg["data"] = {"name": "teacher"}
    p.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(p), "--run-dir", str(tmp_path / "r2")]) == 2
    assert "text-conditional" in capsys.readouterr().err


@pytest.mark.slow
def test_export_reloads_in_a_fresh_process(sd3, runs, tmp_path):
    """A fresh interpreter (no fewstep state) loads the export and reproduces the run's 2-step samples."""
    folder, cond = sd3
    run_dir = runs["meanflow"]
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "diffusers", str(out), "--nfe", "2"]) == 0
    x1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = ConditionTable.load(cond)[0].rows(torch.tensor([0, 4]), torch.device("cpu"), torch.float32)
    torch.save({"x1": x1, **kw}, tmp_path / "inputs.pt")
    code = ("import torch; from fewstep.integrations.diffusers.export import sample_exported; "
            f"d = torch.load({str(tmp_path / 'inputs.pt')!r}); x1 = d.pop('x1'); "
            f"torch.save(sample_exported({str(out)!r}, x1, cond=d).x, {str(tmp_path / 'out.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    run = load_run(run_dir)
    ref = sample_with(run.student(ema=True), x1, run.sampler, 2, cond=torch.tensor([0, 4])).x
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), ref, rtol=1e-5, atol=1e-5)
