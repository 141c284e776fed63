r"""Flow-map students initialised from a diffusers teacher's weights.

The student backbone is a trainable float32 copy of the teacher's denoiser, called through the same time
convention, so :math:`F_\theta(x, t, s') = v_{teacher}(x, t)` at initialisation. A flow map also needs its
second time: for the ``average_velocity`` parameterization (MeanFlow, AYF, Shortcut, IMM, SplitMeanFlow) every
timestep embedder of the model (``TimestepEmbedding`` modules: SD3/Flux/PixArt/DiT ``...timestep_embedder``,
U-Nets ``time_embedding``) gets a *gap embedding* of :math:`h = t - s'` added to its output,

.. math::
    e(h) = W_2\,\mathrm{silu}(W_1 \phi(1000 h) + b_1) + b_2,\qquad W_2 = 0,\ b_2 = 0 \text{ at init},

with :math:`\phi` the 256-dim sinusoidal embedding of diffusers' ``Timesteps`` (flip_sin_to_cos, shift 0), so
the student starts exactly as the teacher's velocity for every s. The ``velocity`` (reflow) and
``consistency`` (CD, CT, sCM, FACM: s' = 0) parameterizations need no second time: their network is the plain
model. The gap embeddings are attached by forward hooks registered for the duration of one call (deep copies
for EMA and fake-score networks stay independent); forward-mode AD (``torch.func.jvp``) runs through them and
through diffusers' attention under :func:`fewstep.core.jvp.math_attention`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.integrations.diffusers.models import TIMESTEP_EMBEDDERS, DiffusersDenoiser

__all__ = ["GapEmbedding", "DiffusersFlowMapNet", "student_from_teacher", "timestep_embedders"]


def timestep_embedders(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of the model's timestep embedders (names ending in :data:`TIMESTEP_EMBEDDERS`)."""
    return {n: m for n, m in model.named_modules()
            if n.split(".")[-1] in TIMESTEP_EMBEDDERS and isinstance(getattr(m, "linear_2", None), nn.Linear)}


class GapEmbedding(nn.Module):
    r""":math:`e(h) = W_2\,\mathrm{silu}(W_1\phi(\mathrm{scale}\cdot h) + b_1) + b_2`, zero output at init.

    Args:
        out_dim: Width of the timestep embedding it is added to.
        dim: Sinusoidal feature size (even).
        scale: Multiplier of h before the sinusoids (1000: the diffusers timestep scale).
    """

    def __init__(self, out_dim: int, dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"gap embedding dim must be even, got {dim}")
        self.dim, self.scale = dim, float(scale)
        self.linear_1 = nn.Linear(dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def features(self, h: Tensor) -> Tensor:
        """diffusers ``get_timestep_embedding(scale*h, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``."""
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=h.device) / half)
        arg = (self.scale * h.float())[:, None] * freqs[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)

    def forward(self, h: Tensor) -> Tensor:
        w = self.linear_1.weight
        return self.linear_2(nn.functional.silu(self.linear_1(self.features(h).to(w.dtype))))


def _gap_key(name: str) -> str:
    return name.replace(".", "__")


class DiffusersFlowMapNet(nn.Module):
    """Backbone ``F(x, t, s, cond)`` = the denoiser's velocity, plus gap embeddings of t - s when ``use_s``.

    Args:
        denoiser: A :class:`DiffusersDenoiser` holding the student's own (trainable) model.
        event_shape: Latent shape.
        use_s: Add gap embeddings of h = t - s (``average_velocity`` students).
        gap_dim: Sinusoidal size of the gap embedding.
        gap_scale: Multiplier of h inside the gap embedding.

    Raises:
        ValueError: when ``use_s`` and the model has no timestep embedder to attach to.
    """

    def __init__(self, denoiser: DiffusersDenoiser, event_shape: tuple[int, ...], use_s: bool = True,
                 gap_dim: int = 256, gap_scale: float = 1000.0) -> None:
        super().__init__()
        self.denoiser, self.event_shape, self.use_s = denoiser, tuple(event_shape), bool(use_s)
        self.gaps = nn.ModuleDict()
        if self.use_s:
            emb = timestep_embedders(denoiser.model)
            if not emb:
                raise ValueError(f"{type(denoiser.model).__name__} has no timestep embedder "
                                 f"({'/'.join(TIMESTEP_EMBEDDERS)}) to attach the t - s embedding to")
            for name, m in emb.items():
                self.gaps[_gap_key(name)] = GapEmbedding(m.linear_2.out_features, gap_dim, gap_scale)
        self.gap_dim, self.gap_scale = gap_dim, float(gap_scale)

    @property
    def num_classes(self) -> int | None:
        return self.denoiser.conditioner.num_classes

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Any = None) -> Tensor:
        """Linear-path velocity of the model at (x, t) with the gap embeddings of h = t - s added."""
        if not self.use_s:
            return self.denoiser.velocity(x, t, cond)
        h = t - s
        handles = []
        model = self.denoiser.model
        for key, gap in self.gaps.items():
            def hook(mod: nn.Module, args: Any, out: Tensor, gap: nn.Module = gap) -> Tensor:
                return out + gap(h).to(out.dtype)
            handles.append(model.get_submodule(key.replace("__", ".")).register_forward_hook(hook))
        try:
            return self.denoiser.velocity(x, t, cond)
        finally:
            for hd in handles:
                hd.remove()

    @torch.no_grad()
    def fold_gap(self, h: float) -> dict[str, Tensor]:
        """Add e(h) to each timestep embedder's output bias (the model alone then equals F at gap h); returns e(h).

        The model then computes :math:`F(x, t, t - h)` without hooks, for any t: the plain diffusers model of a
        one-step (h = 1) average-velocity student. Undo with :meth:`unfold_gap`.
        """
        offsets = {}
        for key, gap in self.gaps.items():
            m = self.denoiser.model.get_submodule(key.replace("__", "."))
            e = gap(torch.tensor([float(h)], device=m.linear_2.bias.device))[0]
            m.linear_2.bias.add_(e.to(m.linear_2.bias.dtype))
            offsets[key] = e.detach().cpu()
        return offsets

    @torch.no_grad()
    def unfold_gap(self, offsets: dict[str, Tensor]) -> None:
        """Subtract the offsets returned by :meth:`fold_gap`."""
        for key, e in offsets.items():
            b = self.denoiser.model.get_submodule(key.replace("__", ".")).linear_2.bias
            b.sub_(e.to(b.device, b.dtype))


def student_from_teacher(teacher: nn.Module, parameterization: str = "average_velocity", gap_dim: int = 256,
                         gap_scale: float = 1000.0, gradient_checkpointing: bool = False) -> FlowMap:
    """A :class:`FlowMap` whose backbone is a float32 copy of the teacher's model (see the module docstring).

    Args:
        teacher: A :class:`~fewstep.integrations.diffusers.teacher.DiffusersTeacher` (or a guided wrapper of one).
        parameterization: ``average_velocity`` (gap embeddings), ``consistency`` or ``velocity`` (plain model).
        gap_dim: Sinusoidal size of the gap embeddings.
        gap_scale: Multiplier of h = t - s in the gap embeddings.
        gradient_checkpointing: Enable the diffusers model's gradient checkpointing (memory for compute).

    Returns:
        The student flow map (trainable, float32).

    Raises:
        ValueError: when the teacher is not a diffusers teacher.
    """
    from fewstep.integrations.diffusers.teacher import DiffusersTeacher

    inner = getattr(teacher, "inner", teacher)
    if not isinstance(inner, DiffusersTeacher):
        raise ValueError(f"student.kind=teacher needs a diffusers teacher (teacher.kind=diffusers); got "
                         f"{type(inner).__name__}")
    model = copy.deepcopy(inner.model).float().requires_grad_(True).train()
    if gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.enable_gradient_checkpointing()
    den = DiffusersDenoiser(model, inner.convention, inner.conditioner, inner.denoiser.embedded_guidance)
    net = DiffusersFlowMapNet(den, inner.event_shape, use_s=parameterization == "average_velocity",
                              gap_dim=gap_dim, gap_scale=gap_scale)
    return FlowMap(net, parameterization)
