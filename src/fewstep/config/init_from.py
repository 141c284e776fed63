r"""The state dict that ``student.init_from`` loads: the source run's student tensor for tensor, or, for a flow-map
student whose source is the same backbone without s (a velocity network), the source's tensors plus a fresh
s-pathway whose output starts at zero, so that :math:`F(x, t, s) = v(x, t)` at step 0 (MeanFlow, Geng et al. 2025;
Align Your Flow, Sabour et al. 2025; sCM, Lu & Song 2024; Shortcut models, Frans et al. 2024 all start there;
:mod:`fewstep.integrations.diffusers.student` does the same for diffusers backbones).

The s-pathway is found from the student's modules, not from key names alone:

* :class:`~fewstep.networks.mlp.MLP` with ``use_s``: the h = t - s features enter the first linear layer
  ``net.0`` through the columns :meth:`~fewstep.networks.mlp.MLP.h_columns`; the source's weight fills the other
  columns and those columns start at zero.
* :class:`~fewstep.networks._blocks.ConditionEmbedding` with ``use_s`` (U-Net, DiT): the keys ``h_mlp.*`` are new;
  ``h_mlp.0`` keeps its random initialisation and the last layer ``h_mlp.2`` starts at zero (weight and bias).

Any other difference (a width, raw_time, classes) is the one-line shape error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.networks._blocks import ConditionEmbedding
from fewstep.networks.mlp import MLP

__all__ = ["init_state"]


def _s_pathway(student: nn.Module) -> tuple[dict[str, list[int]], tuple[str, ...], set[str]]:
    """(first-layer weight key -> its h columns, prefixes of new s-embedding keys, keys to zero) of ``student``."""
    widened: dict[str, list[int]] = {}
    prefixes: list[str] = []
    zero: set[str] = set()
    for name, m in student.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, MLP) and m.h_emb is not None:
            widened[f"{p}net.0.weight"] = m.h_columns()
        elif isinstance(m, ConditionEmbedding) and m.h_mlp is not None:
            prefixes.append(f"{p}h_mlp.")
            zero |= {f"{p}h_mlp.2.weight", f"{p}h_mlp.2.bias"}
    return widened, tuple(prefixes), zero


def _with_fresh_s(student: nn.Module, src: dict[str, Tensor],
                  own: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]] | None:
    """The source's tensors plus a zero-output s-pathway, with the freshly set keys; None when that does not fit."""
    widened, prefixes, zero = _s_pathway(student)
    if (not widened and not prefixes) or set(src) - set(own):
        return None
    out: dict[str, Tensor] = {}
    fresh: list[str] = []
    for k, v in own.items():
        if k in src and src[k].shape == v.shape:
            out[k] = src[k]
        elif k in widened and k in src and v.ndim == 2:
            keep = torch.ones(v.shape[1], dtype=torch.bool)
            keep[widened[k]] = False
            if src[k].shape != (v.shape[0], int(keep.sum())):
                return None
            w = torch.zeros_like(v, dtype=src[k].dtype)
            w[:, keep] = src[k]
            out[k] = w
            fresh.append(f"{k}[:, h columns (zero)]")
        elif k not in src and k.startswith(prefixes):
            out[k] = torch.zeros_like(v) if k in zero else v
            fresh.append(f"{k} (zero)" if k in zero else k)
        else:
            return None
    return (out, fresh) if fresh else None


def init_state(student: nn.Module, src: dict[str, Tensor], where: str) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict ``student`` loads from ``src`` (a run's student) and the keys set afresh (empty: identical).

    Args:
        student: The freshly built student.
        src: The source run's student state dict.
        where: The ``student.init_from=...`` prefix of error messages.

    Returns:
        (state dict for ``student.load_state_dict``, the freshly initialised keys).

    Raises:
        ValueError: the tensors differ by more than the s-pathway (one line naming the first differing key).
    """
    own = student.state_dict()
    shapes = [(k, *(tuple(d[k].shape) if k in d else "missing" for d in (src, own))) for k in sorted({*own, *src})]
    bad = [s for s in shapes if s[1] != s[2]]
    if not bad:
        return src, []
    fitted = _with_fresh_s(student, src, own)
    if fitted is not None:
        return fitted
    widened, prefixes, _ = _s_pathway(student)  # name a key that is not the s-pathway's when there is one
    other = [s for s in bad if s[0] not in widened and not s[0].startswith(prefixes)] or bad
    raise ValueError(f"{where}: its student does not match this one: {other[0][0]!r} is "
                     f"{other[0][1]} there, {other[0][2]} here (use that run's student section)")
