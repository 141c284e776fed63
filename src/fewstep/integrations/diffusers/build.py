"""Config glue for ``fewstep distill``: ``teacher.kind: diffusers``, its data sets and ``student.kind: teacher``.

YAML::

    teacher: {kind: diffusers, path: <save_pretrained folder>, guidance: 4.0,
              kwargs: {dtype: bfloat16, subfolder: transformer, scheduler: <folder>, null_class: 1000}}
    data: {name: embeddings, kwargs: {path: <condition folder>}}   # text models; or name: teacher
    student: {kind: teacher, options: {gap_dim: 256, gradient_checkpointing: false}}
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from fewstep.core.flowmap import FlowMap

__all__ = ["build_diffusers_teacher", "build_diffusers_dataset", "build_teacher_student", "is_diffusers_teacher",
           "DATA_NAMES"]

DATA_NAMES = ("teacher", "embeddings")


def _check_kwargs(fn: Any, kwargs: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> None:
    valid = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls", *skip)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {where}; valid: {valid}")


def build_diffusers_teacher(path: str, kwargs: dict[str, Any]) -> nn.Module:
    """``DiffusersTeacher.from_pretrained(path, **kwargs)`` with unknown options named in one error line."""
    from fewstep.integrations.diffusers.teacher import DiffusersTeacher

    if not path:
        raise ValueError("teacher.kind='diffusers' needs teacher.path (a local save_pretrained folder)")
    _check_kwargs(DiffusersTeacher.from_pretrained, kwargs, "teacher.kwargs", skip=("path",))
    return DiffusersTeacher.from_pretrained(path, **kwargs)


def is_diffusers_teacher(teacher: Any) -> bool:
    """True for a DiffusersTeacher or a guided wrapper of one."""
    from fewstep.integrations.diffusers.teacher import DiffusersTeacher

    return isinstance(getattr(teacher, "inner", teacher), DiffusersTeacher)


def build_diffusers_dataset(name: str, kwargs: dict[str, Any], teacher: nn.Module) -> Any:
    """``teacher``: no data, uniform class labels (class-conditional) or none; ``embeddings``: a condition folder
    (``kwargs.path``) whose table is attached to the teacher and whose rows are drawn uniformly.

    Args:
        name: ``data.name``.
        kwargs: ``data.kwargs``.
        teacher: The diffusers teacher (or a guided wrapper).

    Returns:
        A :class:`LabelDataset` or :class:`ConditionDataset`.

    Raises:
        ValueError: for another name, a missing path, or a text model without embeddings.
    """
    from fewstep.integrations.diffusers.conditioning import ConditionDataset, ConditionTable, LabelDataset

    inner = getattr(teacher, "inner", teacher)
    if name == "teacher":
        if kwargs:
            raise ValueError(f"data.name='teacher' takes no kwargs with a diffusers teacher; got {sorted(kwargs)}")
        if inner.conditioner.kind == "table":
            raise ValueError("this diffusers teacher is text-conditional: set data: {name: embeddings, kwargs: "
                             "{path: <condition folder of precomputed embeddings>}} (see docs/diffusers.md)")
        return LabelDataset(inner.event_shape, inner.num_classes)
    if name != "embeddings":
        raise ValueError(f"data.name={name!r} with a diffusers teacher; expected one of {DATA_NAMES}")
    unknown = sorted(set(kwargs) - {"path"})
    if unknown or not kwargs.get("path"):
        raise ValueError(f"data.name='embeddings' takes kwargs {{path: <condition folder>}}; got {dict(kwargs)}")
    table, latents = ConditionTable.load(kwargs["path"])
    inner.attach_conditioning(table)
    return ConditionDataset(table, latents, inner.event_shape)


def build_teacher_student(teacher: nn.Module, parameterization: str, options: dict[str, Any]) -> FlowMap:
    """``student.kind: teacher``: :func:`~fewstep.integrations.diffusers.student.student_from_teacher`."""
    from fewstep.integrations.diffusers.student import student_from_teacher

    if teacher is None:
        raise ValueError("student.kind='teacher' needs a teacher (teacher.kind=diffusers)")
    _check_kwargs(student_from_teacher, options, "student.options", skip=("teacher", "parameterization"))
    return student_from_teacher(teacher, parameterization, **options)
