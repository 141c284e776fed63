"""Nested state with tensors <-> named tensors + a JSON skeleton, so checkpoints never pickle (optimiser states).

:func:`flatten_tensors` moves every tensor of a nested dict / list / tuple into a flat ``{name: tensor}`` dict (what
safetensors stores) and returns the JSON-able rest, with ``{"__tensor__": name}`` where a tensor was and
``{"__dict__": [[key, value], ...]}`` for dicts, so int keys (optimiser parameter indices) survive JSON as
``{"__int__": k}``. :func:`unflatten_tensors` is its inverse (tuples come back as lists).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["flatten_tensors", "unflatten_tensors"]


def flatten_tensors(tree: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` under a '/'-joined name.

    Returns the JSON-able skeleton, with ``{"__tensor__": name}`` where a tensor was.
    """
    if torch.is_tensor(tree):
        tensors[prefix] = tree
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[_key(k), flatten_tensors(v, f"{prefix}/{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [flatten_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) and not isinstance(k, bool) else k


def unflatten_tensors(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_tensors` (int dict keys and tensors restored)."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {(k["__int__"] if isinstance(k, dict) else k): unflatten_tensors(v, tensors)
                    for k, v in skeleton["__dict__"]}
        return {k: unflatten_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_tensors(v, tensors) for v in skeleton]
    return skeleton
