r"""Strict conversion between nested dicts (YAML, JSON) and config dataclasses.

Every error names the offending dotted key: ``unknown config key 'train.lrr'``,
``config key 'train.steps' must be an int, got 'ten'``. Used by :mod:`fewstep.config.schema` for run configs and by
:func:`fewstep.config.build.build_method` for each method's own config dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

__all__ = ["OMIT_IF_DEFAULT", "check_value", "from_dict", "to_dict"]

#: Field metadata key: :func:`to_dict` leaves the field out while it holds its default (an optional section, so
#: run folders and config hashes of runs that do not use it stay as they were).
OMIT_IF_DEFAULT = "omit_if_default"


def _article(tp: type) -> str:
    return ("an " if tp.__name__[0] in "aeiou" else "a ") + tp.__name__


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ValueError naming ``key``.

    Accepts ints for floats, numeric strings for numbers (YAML 1.1 reads ``1e-3`` as a string), lists
    for tuples, and ``None`` only for Optional types.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args:  # Optional[X]: X's own error (e.g. an unknown key of a section)
            return check_value(key, value, next(a for a in args if a is not type(None)))
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(key, value, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"config key {key!r} must be one of {[_type_name(a) for a in args]}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} must be a bool, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise ValueError(f"config key {key!r} must be {_article(tp)}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} must be {_article(tp)}, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ValueError(f"config key {key!r} must be an int, got {value!r}")
        return tp(value)
    if tp is str:
        if value is False and key.endswith("amp"):
            return "off"  # YAML 1.1 reads an unquoted `off` as False
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a str, got {value!r}")
        return value
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and origin is tuple:
            return tuple(check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        if args:
            return (tuple if origin is tuple else list)(check_value(f"{key}[{i}]", v, args[0])
                                                        for i, v in enumerate(value))
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        args = typing.get_args(tp)
        if args:
            return {k: check_value(f"{key}.{k}", v, args[1]) for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and wrong types by dotted name.

    Args:
        cls: The dataclass to build.
        data: Field values by name (nested dicts for nested dataclasses); None gives the defaults.
        prefix: Dotted name of this section, used in error messages (e.g. ``train``).

    Returns:
        An instance of ``cls``.

    Raises:
        ValueError: ``unknown config key 'train.lrr'`` or ``config key 'train.steps' must be an int``.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            name = f"{prefix}.{k}" if prefix else str(k)
            raise ValueError(f"unknown config key {name!r}; valid keys here: {sorted(fields)}")
    kwargs = {k: check_value(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain nested dict (tuples become lists), ready for YAML/JSON; fields marked
    :data:`OMIT_IF_DEFAULT` are left out while they hold their default."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if not (f.metadata.get(OMIT_IF_DEFAULT) and getattr(v, f.name) == f.default)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v
    return conv(cfg)
