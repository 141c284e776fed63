"""The method registry: name -> Method class. Each method module registers itself with :func:`register`.

Importing :mod:`fewstep.methods` imports every method module (one line each in ``methods/__init__.py``), so
the registry is complete whenever any of its names is reachable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fewstep.methods.base import Method

__all__ = ["METHODS", "register", "get_method", "list_methods"]

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """Look up a registered method by name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> dict[str, str]:
    """Registered method names and their one-line descriptions."""
    return {k: METHODS[k].description for k in sorted(METHODS)}
