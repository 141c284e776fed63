"""The identity of a teacher, recorded next to whatever was computed from it (reflow pairs, caches).

A cache made by one teacher must never be reused silently with another: :func:`teacher_fingerprint` hashes an
analytic teacher by its JSON spec and a neural one by its weights.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

__all__ = ["teacher_fingerprint"]


def teacher_fingerprint(teacher: nn.Module | Any, path: str | None = None) -> dict[str, str]:
    """Identity of a teacher: sha256 over its preset spec, or over its state_dict, plus class name and path.

    A :class:`~fewstep.teachers.GaussianMixtureTeacher` (anything with ``to_dict``) is hashed by its
    JSON spec; any other module by the names, dtypes, shapes and bytes of its state_dict tensors.

    Args:
        teacher: The teacher (module, or a VelocityFlowMap wrapping one).
        path: Optional checkpoint path to record.

    Returns:
        Dict with ``class``, ``sha256`` and ``path``.
    """
    h = hashlib.sha256()
    h.update(type(teacher).__name__.encode())
    if hasattr(teacher, "to_dict"):
        h.update(json.dumps(teacher.to_dict(), sort_keys=True).encode())
    else:
        module = teacher
        if not isinstance(module, nn.Module) or not module.state_dict():
            inner = getattr(teacher, "velocity_fn", None)
            module = getattr(inner, "__self__", inner)
        if not isinstance(module, nn.Module):
            raise ValueError(f"cannot fingerprint a teacher of type {type(teacher).__name__}: it is neither a "
                             "preset (to_dict) nor an nn.Module with a state_dict; pass fingerprint= explicitly")
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return {"class": type(teacher).__name__, "sha256": h.hexdigest(), "path": str(path or "")}
