r"""Build teacher, dataset, student and method from a :class:`~fewstep.config.schema.RunConfig`, and reload runs.

* teacher: ``preset`` -> ``load_preset(name, conditional)``; ``json`` -> ``load_preset(path)``; ``run`` -> the
  EMA student of a flow-matching run folder wrapped as a velocity teacher (``ModuleTeacher.from_flowmap``).
  The guidance weight w goes to the method's ``guidance`` field when it has one (w = 1 included, unless
  ``method.cfg.guidance`` is set: a method's own default weight never overrides the teacher's), else a w != 1
  teacher is wrapped so that its default velocity is the guided one, v_u + w (v_c - v_u).
* data: ``teacher`` -> exact samples x0 ~ p_0 of the analytic teacher; anything else ->
  ``fewstep.data.datasets.get_dataset(name, **kwargs)``.
* student: ``FlowMap(build_network(kind, ...), parameterization)`` (an MLP, U-Net or DiT) with the
  method's parameterization unless the config names one; ``student.init_from`` copies a previous run's final
  (EMA) student into it, shapes checked (:func:`init_student_from`); a flow-map student from a velocity run gets
  a zero-output s-pathway (:mod:`fewstep.config.init_from`).
* score_teacher (optional): built like ``teacher`` and passed to ``method.set_score_teacher`` (the MA target of
  k-rectified flow: pairs from the previous round, score from the original teacher).
* ``load_run``: ``build_method`` on the folder's config, then its newest checkpoint's weights; reading the folder
  (``config.yaml``, checkpoint tensors, :class:`~fewstep.config.run_folder.LoadedRun`) is
  :mod:`fewstep.config.run_folder`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.config.init_from import init_state
from fewstep.config.run_folder import LoadedRun, load_run_weights, read_run_config
from fewstep.config.schema import (
    RunConfig,
    StudentConfig,
    TeacherConfig,
    check_value,
    from_dict,
)
from fewstep.core.flowmap import FlowMap
from fewstep.methods.base import Method
from fewstep.methods.registry import METHODS, get_method
from fewstep.networks.factory import build_network
from fewstep.sampling.spec import SamplerSpec
from fewstep.teachers.guided import GuidedTeacher
from fewstep.training.callbacks import EvalCallback, SampleFigureCallback
from fewstep.training.trainer import Trainer

__all__ = ["build_teacher", "build_dataset", "build_student", "build_method", "build_run", "load_run",
           "load_run_student", "resolve_sampler", "build_from_objects", "init_student_from"]


def build_teacher(cfg: TeacherConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen teacher named by the ``teacher`` section (see module docstring)."""
    if cfg.kind == "preset":
        from fewstep.teachers.presets import load_preset

        teacher: nn.Module = load_preset(cfg.name, conditional=cfg.conditional)
    elif cfg.kind == "json":
        from fewstep.teachers.presets import load_preset

        if not cfg.path:
            raise ValueError("teacher.kind='json' needs teacher.path (a mixture JSON file)")
        teacher = load_preset(cfg.path, conditional=cfg.conditional)
    elif cfg.kind == "run":
        from fewstep.teachers.module import ModuleTeacher

        if not cfg.path:
            raise ValueError("teacher.kind='run' needs teacher.path (a run folder of `fewstep train-teacher`)")
        teacher = ModuleTeacher.from_flowmap(load_run_student(cfg.path, ema=True))
    elif cfg.kind == "diffusers":
        from fewstep.integrations.diffusers.build import build_diffusers_teacher

        teacher = build_diffusers_teacher(cfg.path, dict(cfg.kwargs))
    else:
        raise ValueError(f"unknown teacher.kind {cfg.kind!r}; expected preset, json, run or diffusers")
    teacher = teacher.to(device).eval().requires_grad_(False)
    return teacher


def build_dataset(name: str, kwargs: dict[str, Any], teacher: nn.Module | None) -> Any:
    """``teacher`` -> exact samples of an analytic teacher; otherwise ``fewstep.data.datasets.get_dataset``."""
    from fewstep.data.datasets import MixtureDataset, get_dataset
    from fewstep.teachers.gmm import GaussianMixtureTeacher

    if type(getattr(teacher, "inner", teacher)).__name__ == "DiffusersTeacher":
        from fewstep.integrations.diffusers.build import build_diffusers_dataset

        return build_diffusers_dataset(name, kwargs, teacher)
    if name == "teacher":
        inner = getattr(teacher, "inner", teacher)
        if not isinstance(inner, GaussianMixtureTeacher):
            raise ValueError("data.name='teacher' (exact teacher samples) needs an analytic mixture teacher; "
                             "set data.name to a dataset (e.g. ring8, digits)")
        return MixtureDataset(inner, **kwargs)
    return get_dataset(name, **kwargs)


def build_student(cfg: StudentConfig, method_cls: type[Method], event_shape: tuple[int, ...],
                  num_classes: int | None) -> FlowMap:
    """``FlowMap(build_network(cfg.kind, ...), parameterization)``; the network sees s only for ``average_velocity``."""
    param = cfg.parameterization or method_cls.parameterization
    net = build_network(cfg.kind, tuple(event_shape), num_classes=num_classes, use_s=param == "average_velocity",
                        hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim, activation=cfg.activation,
                        max_freq=cfg.max_freq, min_freq=cfg.min_freq, raw_time=cfg.raw_time, options=cfg.options)
    return FlowMap(net, param)


def _method_config(method_cls: type[Method], raw: dict[str, Any], guidance: float) -> tuple[Any, bool]:
    """Typed method config from ``method.cfg`` (key errors name ``method.cfg.<key>``); returns (cfg, used_w)."""
    fields = {f.name: f for f in dataclasses.fields(method_cls.config_class)}
    import typing

    hints = typing.get_type_hints(method_cls.config_class)
    for k in raw:
        if k not in fields:
            raise ValueError(f"unknown config key 'method.cfg.{k}' for method {method_cls.name!r}; "
                             f"valid keys: {sorted(fields)}")
    kw = {k: check_value(f"method.cfg.{k}", v, hints[k]) for k, v in raw.items()}
    used = False
    key = "guidance" if "guidance" in fields else None  # every teacher-guided method names its CFG weight so
    if guidance != 1.0 and key is not None:
        if key in kw and float(kw[key]) != guidance:
            raise ValueError(f"teacher.guidance={guidance} conflicts with method.cfg.{key}={kw[key]}")
        kw[key], used = guidance, True
    elif key is not None and key not in kw:
        kw[key] = guidance  # w = 1 too: a method's own default weight (CDM, decoupled DMD: 3) never overrides it
    return method_cls.make_config(**kw), used


def build_method(cfg: RunConfig, device: str | torch.device | None = None) -> tuple[Method, Any, nn.Module | None]:
    """Build (method, dataset, teacher) for a run config, everything on ``device`` (default cfg.device)."""
    name = str(device or cfg.device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    torch.manual_seed(cfg.seed)
    method_cls = get_method(cfg.method.name)
    if cfg.score_teacher is not None and not hasattr(method_cls, "set_score_teacher"):
        users = ", ".join(sorted(n for n, c in METHODS.items() if hasattr(c, "set_score_teacher")))
        raise ValueError(f"score_teacher is set but method {cfg.method.name!r} has no marginal-alignment score "
                         f"target; only {users} use it (remove the score_teacher section)")
    mcfg, used_w = _method_config(method_cls, dict(cfg.method.cfg), cfg.teacher.guidance)
    wants = method_cls.uses_teacher(mcfg) or cfg.data.name == "teacher"
    teacher = build_teacher(cfg.teacher, dev) if wants else None
    data_kwargs = dict(cfg.data.kwargs)
    if cfg.data.name == "teacher" and cfg.teacher.kind == "preset":
        # labels iff the teacher section asks for classes (the digits preset always carries its 10 classes)
        data_kwargs.setdefault("conditional", cfg.teacher.conditional)
    dataset = build_dataset(cfg.data.name, data_kwargs, teacher)
    if teacher is not None and cfg.teacher.guidance != 1.0 and not used_w:
        teacher = GuidedTeacher(teacher, cfg.teacher.guidance)
    num_classes = getattr(dataset, "num_classes", None)
    if cfg.student.kind == "teacher":  # a copy of the (diffusers) teacher's own network
        from fewstep.integrations.diffusers.build import build_teacher_student

        student = build_teacher_student(teacher, cfg.student.parameterization or method_cls.parameterization,
                                        dict(cfg.student.options))
    else:
        student = build_student(cfg.student, method_cls, tuple(dataset.event_shape), num_classes)
    if cfg.student.init_from:
        init_student_from(student, cfg.student.init_from)
    method = method_cls(student.to(dev), teacher, mcfg).to(dev)
    if cfg.score_teacher is not None:
        method.set_score_teacher(build_teacher(cfg.score_teacher, dev))
    return method, dataset, teacher


def build_run(cfg: RunConfig, device: str | torch.device | None = None, run_dir: str | Path | None = None,
              resume: bool = False, with_eval: bool = True) -> Any:
    """A ready :class:`~fewstep.training.trainer.Trainer` for ``cfg`` (eval + figure callbacks for mixture teachers)."""
    from fewstep.config.schema import to_dict
    from fewstep.teachers.gmm import GaussianMixtureTeacher

    method, dataset, teacher = build_method(cfg, device)
    callbacks = []
    inner = getattr(teacher, "inner", teacher) if teacher is not None else getattr(dataset, "teacher", None)
    if not isinstance(inner, GaussianMixtureTeacher):  # k-RF: a learned pair teacher, scored by the analytic one
        inner = getattr(method, "score_teacher", None)
    if with_eval and cfg.eval.nfe and isinstance(inner, GaussianMixtureTeacher):
        spec = resolve_sampler(cfg)
        callbacks.append(EvalCallback(inner, nfe=cfg.eval.nfe, n=cfg.eval.n_samples, seed=cfg.seed, sampler=spec))
        if inner.dim == 2 and dataset.num_classes is None:
            callbacks.append(SampleFigureCallback(lambda n: inner.sample(n, generator=torch.Generator()
                                                                         .manual_seed(1)), nfe=cfg.eval.nfe,
                                                  sampler=spec))
    return Trainer(method, dataset, cfg.train, run_dir=run_dir, callbacks=callbacks, seed=cfg.seed,
                   resume=resume, run_config=to_dict(cfg))


def resolve_sampler(cfg: RunConfig, gamma: float | None = None, grid: str | None = None) -> SamplerSpec:
    """The sampler of a run: explicit ``gamma``/``grid`` > config ``sampler`` section > the method's own for its
    config (``Method.sampler_for``)."""
    own = get_method(cfg.method.name).sampler_for(dict(cfg.method.cfg))
    g = gamma if gamma is not None else (cfg.sampler.gamma if cfg.sampler.gamma is not None else own.gamma)
    kind = grid or cfg.sampler.grid or own.grid
    return SamplerSpec(gamma=float(g), grid=kind)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's method from ``config.yaml`` and load its newest valid checkpoint (EMA copies included).

    Args:
        run_dir: The run folder (holds ``config.yaml`` and ``ckpt-<step>/`` folders).
        device: Device to build the method on and load the tensors to.

    Returns:
        The rebuilt run: config, method with raw weights, teacher, EMA students, step, sampler and folder.

    Raises:
        FileNotFoundError: no config.yaml, or no checkpoint at all.
        CheckpointError: checkpoints exist but none is complete and valid (each problem is named).
    """
    root = Path(run_dir)
    cfg = read_run_config(root)
    # the checkpoint replaces the student's weights: student.init_from is not read again (that run may be gone)
    method, _, teacher = build_method(dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, init_from="")),
                                      device)
    step, emas = load_run_weights(root, method, device)
    return LoadedRun(cfg, method, teacher, emas, step, resolve_sampler(cfg), root)


def load_run_student(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> FlowMap:
    """The student of a run folder (the first EMA copy when ``ema`` and one exists), in eval mode."""
    return load_run(run_dir, device).student(ema)


def _check_fixed_buffers(student: nn.Module, source: nn.Module, saved: dict[str, Tensor], where: str) -> None:
    """One-line error when a buffer that is not in ``saved`` (``source``'s state dict; e.g. the time embedding's
    ``freqs``, set by ``student.max_freq`` / ``min_freq``) differs between ``source`` and ``student``: the loaded
    weights would run on features they were never trained on, silently."""
    theirs = dict(source.named_buffers())
    for name, b in student.named_buffers():
        a = theirs.get(name)
        if name in saved or a is None:
            continue
        if a.shape != b.shape or not torch.allclose(a.to(b.dtype), b):
            raise ValueError(f"{where}: fixed buffer {name!r} differs from the run's (a time-embedding setting such "
                             f"as student.max_freq / min_freq / emb_dim must match the run's config)")


def init_student_from(student: nn.Module, run_dir: str | Path) -> None:
    """``student.init_from``: load the final student of run folder ``run_dir`` (its first EMA copy, else the raw
    weights; :func:`load_run`) into ``student``; errors are one line naming the key.

    Args:
        student: The freshly built student (same architecture as the run's).
        run_dir: The previous run's folder.

    Raises:
        FileNotFoundError: no run folder, or no checkpoint in it.
        CheckpointError: every checkpoint is incomplete or corrupt.
        ValueError: the run's student has other tensors or shapes than this one, beyond a new s-pathway
            (:mod:`fewstep.config.init_from`), or another unsaved buffer (time-embedding frequencies).
    """
    from fewstep.training.checkpoint import CheckpointError

    try:
        source = load_run_student(run_dir, ema=True)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise type(e)(f"student.init_from={str(run_dir)!r}: {e}") from None
    src = source.state_dict()
    _check_fixed_buffers(student, source, src, f"student.init_from={str(run_dir)!r}")
    state, fresh = init_state(student, src, f"student.init_from={str(run_dir)!r}")
    if fresh:  # a flow-map student from a velocity run: F(x, t, s) = v(x, t) at step 0
        print(f"fewstep: student.init_from={str(run_dir)!r}: loaded its {len(src)} tensors; new "
              f"s-pathway, output zero at init: {', '.join(fresh)}", file=sys.stderr)
    student.load_state_dict(state)


def build_from_objects(method: str | Method, teacher: Any, dataset: Any, method_cfg: dict[str, Any],
                       student: dict[str, Any], seed: int) -> tuple[Method, Any]:
    """Objects for :func:`fewstep.api.train`: names or ready objects for method, teacher, dataset."""
    if isinstance(method, Method):
        return method, dataset
    torch.manual_seed(seed)
    method_cls = get_method(method)
    if isinstance(teacher, str):
        teacher = build_teacher(TeacherConfig(kind="preset", name=teacher))
    if dataset is None or isinstance(dataset, str):
        dataset = build_dataset(dataset or "teacher", {}, teacher)
    mcfg, _ = _method_config(method_cls, method_cfg, 1.0)
    scfg = from_dict(StudentConfig, student, prefix="student")
    event = tuple(getattr(dataset, "event_shape", None) or teacher.event_shape)
    net = build_student(scfg, method_cls, event, getattr(dataset, "num_classes", None))
    return method_cls(net, teacher, mcfg), dataset
