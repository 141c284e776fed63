r"""Export a student of a diffusers teacher as a diffusers folder, reload it, and sample it.

``export_student`` writes into OUT:

* ``transformer/`` or ``unet/``: the student's diffusers model (``save_pretrained``). For an ``average_velocity``
  student the gap embedding at h = 1 is folded into the timestep embedders' output biases, so the plain model
  computes :math:`F(x, t, t-1)`; with t = 1 that is the one-step student.
* ``scheduler/``: flow teachers: ``FlowMatchEulerDiscreteScheduler`` (shift 1: the grid is passed as ``sigmas``;
  ``stochastic_sampling`` = the student's gamma == 1); VP teachers: ``DDIMScheduler`` of the teacher's betas
  (its config carries the time convention).
* ``fewstep_student/``: ``student.json`` (parameterization, sampler gamma / grid / default steps, convention) and,
  for ``average_velocity`` students, ``gaps.safetensors`` (the gap embeddings and the folded offsets).
* the teacher's other pipeline components (``vae``, text encoders, tokenizers ...) and its ``model_index.json``
  (scheduler entry replaced) when the teacher was a pipeline folder, so its pipeline class loads OUT.

:func:`load_exported` rebuilds the exact fewstep flow map in a fresh process (diffusers + fewstep);
:func:`sample_exported` samples it with the student's own sampler. Which students diffusers' standard
``FlowMatchEulerDiscreteScheduler`` loop samples exactly (flow-matching teachers), with ``sigmas`` = the grid
without its final 0: ``velocity`` students (any steps: the flow map is an Euler step), ``consistency`` students
(any steps; gamma = 1 <-> ``stochastic_sampling=True``, gamma = 0 <-> False: f = x - (t - s) F(x, t, 0) is that
scheduler's step), and ``average_velocity`` students at exactly one step (h = 1 is folded). Multi-step
``average_velocity`` students need the gap input at each step's h and sample through :func:`sample_exported`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.integrations.diffusers.conventions import FlowConvention
from fewstep.integrations.diffusers.models import DiffusersDenoiser, conditioner_for, load_component
from fewstep.integrations.diffusers.student import DiffusersFlowMapNet
from fewstep.sampling.samplers import SampleResult
from fewstep.sampling.spec import SamplerSpec, sample_with

__all__ = ["export_student", "load_exported", "sample_exported", "diffusers_euler_exact", "META_DIR"]

META_DIR = "fewstep_student"


def diffusers_euler_exact(parameterization: str, nfe: int, gamma: float) -> bool:
    """Whether diffusers' FlowMatchEulerDiscreteScheduler loop reproduces this student exactly (module docstring)."""
    if parameterization == "velocity":
        return gamma == 0.0
    if parameterization == "consistency":
        return gamma in (0.0, 1.0)
    return nfe == 1


def export_student(student: FlowMap, teacher: nn.Module, out: str | Path, sampler: SamplerSpec | None = None,
                   nfe: int = 1, components: str = "copy") -> Path:
    """Write ``student`` (a flow map built by ``student_from_teacher``) as a diffusers folder (module docstring).

    Args:
        student: The trained student.
        teacher: Its :class:`~fewstep.integrations.diffusers.teacher.DiffusersTeacher` (or a guided wrapper).
        out: Output folder (created; must be empty or absent).
        sampler: The student's multi-step sampler (default deterministic, uniform grid).
        nfe: Default number of steps recorded in ``student.json``.
        components: Other pipeline components of the teacher folder: ``copy``, ``link`` (symlinks) or ``none``.

    Returns:
        The output folder.

    Raises:
        ValueError: for a student that is not a diffusers student, a non-empty ``out`` or a bad option.
    """
    net = student.net
    if not isinstance(net, DiffusersFlowMapNet):
        raise ValueError(f"--format diffusers needs a student built from a diffusers teacher (student.kind=teacher); "
                         f"this run's student is {type(net).__name__}")
    if components not in ("copy", "link", "none"):
        raise ValueError(f"components must be copy, link or none; got {components!r}")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"export folder {str(root)!r} is not empty")
    inner = getattr(teacher, "inner", teacher)
    spec = sampler or SamplerSpec()
    conv = net.denoiser.convention
    src = Path(inner.source) if inner.source else None
    comp = "unet" if "UNet" in type(net.model).__name__ else "transformer"
    root.mkdir(parents=True, exist_ok=True)
    meta_dir = root / META_DIR
    meta_dir.mkdir()
    offsets: dict[str, Tensor] = {}
    if net.use_s:
        offsets = net.fold_gap(1.0)
    try:
        net.model.save_pretrained(str(root / comp))
    finally:
        if offsets:
            net.unfold_gap(offsets)
    if net.use_s:
        gaps = {f"gap.{k}": v.detach().cpu().contiguous() for k, v in net.gaps.state_dict().items()}
        gaps.update({f"offset.{k}": v.contiguous() for k, v in offsets.items()})
        save_file(gaps, str(meta_dir / "gaps.safetensors"))
    diffusers = __import__("diffusers")
    if isinstance(conv, FlowConvention):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(inner.scheduler.config.get("num_train_timesteps", 1000)), shift=1.0,
            stochastic_sampling=student.parameterization == "consistency" and spec.gamma == 1.0)
    else:
        sched = diffusers.DDIMScheduler.from_config(inner.scheduler.config, clip_sample=False, thresholding=False,
                                                    set_alpha_to_one=True)
    sched.save_pretrained(str(root / "scheduler"))
    meta = {"parameterization": student.parameterization, "component": comp, "sampler": spec.to_dict(), "nfe": nfe,
            "grid": spec.times(nfe).tolist(), "convention": repr(conv), "event_shape": list(net.event_shape),
            "null_class": net.denoiser.conditioner.null_class, "gap_dim": net.gap_dim, "gap_scale": net.gap_scale,
            "timestep_scale": getattr(conv, "timestep_scale", None),
            "prediction_type": getattr(conv, "prediction_type", None),
            "embedded_guidance": net.denoiser.embedded_guidance,
            "diffusers_euler_exact": diffusers_euler_exact(student.parameterization, nfe, spec.gamma)
            if isinstance(conv, FlowConvention) else False, "teacher": inner.source}
    (meta_dir / "student.json").write_text(json.dumps(meta, indent=1))
    if src is not None and components != "none":
        _copy_components(src, root, comp, components, type(sched).__name__)
    return root


def _copy_components(src: Path, root: Path, comp: str, how: str, sched_class: str) -> None:
    """Other sub-folders of a teacher pipeline folder, and its model_index.json with the new scheduler class."""
    base = src if not (src / "config.json").is_file() else None
    if base is None:
        return
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and p.name not in (comp, "scheduler", META_DIR)):
        if how == "link":
            (root / sub.name).symlink_to(sub.resolve(), target_is_directory=True)
        else:
            shutil.copytree(sub, root / sub.name)
    index = base / "model_index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        if "scheduler" in data:
            data["scheduler"] = ["diffusers", sched_class]
        (root / "model_index.json").write_text(json.dumps(data, indent=1))


def load_exported(folder: str | Path, device: str | torch.device = "cpu") -> tuple[FlowMap, dict[str, Any]]:
    """(flow map, student.json) rebuilt from an exported folder: the same F(x, t, s, cond) as the trained student.

    ``cond`` of the returned flow map is a dict of the model's keyword arguments (``encoder_hidden_states``,
    ``pooled_projections``, ``class_labels`` ...) or, for class-conditional models, a LongTensor of labels.

    Args:
        folder: An export folder.
        device: Where to put the flow map.

    Returns:
        (flow map in eval mode without gradients, the parsed ``student.json``).

    Raises:
        ValueError: when the folder is not a fewstep export.
    """
    from fewstep.integrations.diffusers.conventions import convention_from_scheduler

    root = Path(folder)
    meta_file = root / META_DIR / "student.json"
    if not meta_file.is_file():
        raise ValueError(f"{str(root)!r} is not a fewstep diffusers export (no {META_DIR}/student.json)")
    meta = json.loads(meta_file.read_text())
    model = load_component(root / meta["component"]).float().eval()
    sched = load_component(root / "scheduler", config_name="scheduler_config.json")
    conv = convention_from_scheduler(sched, meta.get("timestep_scale"), meta.get("prediction_type"))
    den = DiffusersDenoiser(model, conv, conditioner_for(model, meta.get("null_class")),
                            meta.get("embedded_guidance"))
    use_s = meta["parameterization"] == "average_velocity"
    net = DiffusersFlowMapNet(den, tuple(meta["event_shape"]), use_s, meta["gap_dim"], meta["gap_scale"])
    if use_s:
        tensors = load_file(str(root / META_DIR / "gaps.safetensors"))
        net.gaps.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gap.")})
        net.unfold_gap({k[7:]: v for k, v in tensors.items() if k.startswith("offset.")})
    return FlowMap(net, meta["parameterization"]).to(device).eval().requires_grad_(False), meta


@torch.no_grad()
def sample_exported(folder: str | Path, x1: Tensor, cond: Any = None, nfe: int | None = None,
                    grid: Any = None, seed: int = 0, generator: torch.Generator | None = None) -> SampleResult:
    """Samples of an exported student with its own sampler (gamma and grid rule from ``student.json``)."""
    flowmap, meta = load_exported(folder, x1.device)
    spec = SamplerSpec(**meta["sampler"])
    return sample_with(flowmap, x1, spec, nfe or int(meta["nfe"]), grid=grid, cond=cond, seed=seed,
                       generator=generator)


def export_run(run_dir: str | Path, out: str | Path, nfe: int | None = None, ema: bool = True,
               components: str = "copy") -> Path:
    """``fewstep export RUN --format diffusers OUT``: the run's (EMA) student with the run's sampler."""
    from fewstep.config.build import load_run

    run = load_run(run_dir)
    if run.teacher is None:
        raise ValueError(f"run {str(run_dir)!r} has no teacher; --format diffusers exports students of diffusers "
                         "teachers")
    student = run.student(ema=ema)
    k = int(nfe) if nfe is not None else 1
    path = export_student(student, run.teacher, out, run.sampler, k, components)
    meta = json.loads((path / META_DIR / "student.json").read_text())
    print(f"exported ckpt-{run.step} of {run_dir} ({'EMA' if ema and run.ema_students else 'raw'} weights, "
          f"{meta['parameterization']} student, sampler {run.sampler.describe()}) to {path}")
    exact = "yes" if meta["diffusers_euler_exact"] else "no (use fewstep.integrations.diffusers.sample_exported)"
    print(f"  diffusers' FlowMatchEulerDiscreteScheduler reproduces it at {k} step(s): {exact}")
    return path
