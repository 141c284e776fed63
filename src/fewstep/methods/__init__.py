"""Training methods: one file per method, each registered by name (see :mod:`fewstep.methods.base`)."""

from .base import METHODS, Batch, Method, MethodConfig, get_method, list_methods, register

__all__ = ["Batch", "Method", "MethodConfig", "METHODS", "get_method", "list_methods", "register"]
