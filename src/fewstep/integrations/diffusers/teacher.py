r"""A diffusers model as a fewstep :class:`~fewstep.teachers.base.Teacher` on the linear path.

``DiffusersTeacher.from_pretrained(folder)`` loads the denoiser (``transformer`` / ``unet``), its scheduler (which
fixes the time convention: flow matching or a discrete VP schedule with epsilon / v / sample prediction, see
:mod:`fewstep.integrations.diffusers.conventions`) and, when present, the VAE. The teacher's event shape is the
latent shape; fewstep trains in latent space and only :meth:`DiffusersTeacher.decode` touches the VAE.
Velocity, score and x0 follow from the velocity by the linear path's exact conversions, like every teacher;
guidance is :meth:`Teacher.velocity`'s :math:`v_u + w(v_c - v_u)` with the null class / null embedding for
:math:`v_u`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.paths import LinearPath
from fewstep.integrations.diffusers.conditioning import Conditioner, ConditionTable
from fewstep.integrations.diffusers.conventions import FlowConvention, VPConvention, convention_from_scheduler
from fewstep.integrations.diffusers.models import (
    DiffusersDenoiser,
    conditioner_for,
    event_shape_of,
    load_component,
    resolve_folder,
)
from fewstep.teachers.base import Teacher

__all__ = ["DiffusersTeacher", "DTYPES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class DiffusersTeacher(Teacher):
    """A frozen diffusers denoiser exposing fewstep's velocity / score / x0 on ``x_t = (1-t) x0 + t x1``.

    Args:
        model: The diffusers denoiser.
        scheduler: Its scheduler (defines the convention and the teacher's own sampling grid).
        event_shape: Latent shape (C, H, W); default from the model config.
        null_class: Label used for unconditional rows of a class-conditional model (DiT: its dropout token).
        vae: Optional ``AutoencoderKL`` for :meth:`decode`.
        timestep_scale: Flow models only: model timestep per unit t (default num_train_timesteps; Flux: 1).
        prediction_type: VP models only: override the scheduler's prediction type.
        embedded_guidance: Guidance-distilled models (Flux-dev): value fed to the guidance embedder.
        source: The folder the teacher came from (recorded for export).
    """

    path = LinearPath()

    def __init__(self, model: nn.Module, scheduler: Any, event_shape: Sequence[int] | None = None,
                 null_class: int | None = None, vae: nn.Module | None = None, timestep_scale: float | None = None,
                 prediction_type: str | None = None, embedded_guidance: float | None = None,
                 source: str = "") -> None:
        super().__init__()
        if timestep_scale is None and type(model).__name__.startswith("Flux"):
            timestep_scale = 1.0  # Flux multiplies the timestep by 1000 inside forward
        convention = convention_from_scheduler(scheduler, timestep_scale, prediction_type)
        shape = tuple(event_shape) if event_shape is not None else event_shape_of(model)
        if shape is None:
            raise ValueError(f"{type(model).__name__} has no in_channels/sample_size in its config: set "
                             "teacher.kwargs.event_shape")
        self.denoiser = DiffusersDenoiser(model, convention, conditioner_for(model, null_class), embedded_guidance)
        self.scheduler = scheduler
        self.event_shape = tuple(int(s) for s in shape)
        self.vae = vae
        self.source = str(source)
        self.requires_grad_(False).eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, scheduler: str | None = None,
                        dtype: str | torch.dtype | None = None, null_class: int | None = None,
                        event_shape: Sequence[int] | None = None, timestep_scale: float | None = None,
                        prediction_type: str | None = None, load_vae: bool = True,
                        embedded_guidance: float | None = None) -> DiffusersTeacher:
        """Load from a local ``save_pretrained`` folder (pipeline, model + scheduler, or model + ``scheduler`` option).

        Args:
            path: The folder.
            subfolder: Denoiser sub-folder (default: ``transformer`` or ``unet``, or the folder itself).
            scheduler: A scheduler folder, when the model folder has none next to it.
            dtype: Teacher weights dtype (``bfloat16`` halves memory; no gradients flow through the teacher).
            null_class: Null label of a class-conditional model.
            event_shape: Latent shape override.
            timestep_scale: Flow models: model timestep per unit t.
            prediction_type: VP models: override of the scheduler's prediction type.
            load_vae: Load the pipeline's VAE for decoding, when there is one.
            embedded_guidance: Guidance-distilled models (Flux-dev's ``guidance_embeds``): the guidance value.

        Returns:
            The frozen teacher.

        Raises:
            ValueError: for a folder without a model or without a scheduler, or an unknown dtype.
        """
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"unknown teacher dtype {dtype!r}; expected one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        where = resolve_folder(path, subfolder, scheduler)
        if where.scheduler is None:
            raise ValueError(f"no scheduler config found for {str(where.model)!r}: save the scheduler next to the "
                             "model (a 'scheduler' folder) or set teacher.kwargs.scheduler to a scheduler folder")
        model = load_component(where.model, dtype)
        sched = load_component(where.scheduler, config_name="scheduler_config.json")
        vae = load_component(where.vae) if (load_vae and where.vae is not None) else None
        return cls(model, sched, event_shape, null_class, vae, timestep_scale, prediction_type, embedded_guidance,
                   source=str(path))

    # ------------------------------------------------------------------ the Teacher interface
    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    @property
    def convention(self) -> FlowConvention | VPConvention:
        return self.denoiser.convention

    @property
    def conditioner(self) -> Conditioner:
        return self.denoiser.conditioner

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        return self.conditioner.num_classes

    def attach_conditioning(self, table: ConditionTable | None) -> None:
        """Give a text-conditional teacher its table of precomputed embeddings (ids index its rows).

        Args:
            table: The table, or None (no-op).

        Raises:
            ValueError: when the model takes no embeddings but a table is given.
        """
        if table is None:
            return
        if self.conditioner.kind != "table":
            raise ValueError(f"{type(self.model).__name__} takes no text embeddings (conditioning "
                             f"{self.conditioner.kind!r}); it needs no condition table")
        self.conditioner.table = table

    def _velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Linear-path velocity from the model output (conventions module docstring)."""
        return self.denoiser.velocity(x, t, cond)

    # ------------------------------------------------------------------ sampling helpers
    def sampling_grid(self, n: int, **set_timesteps_kwargs: Any) -> list[float]:
        """The scheduler's own n-step grid in fewstep time: flow sigmas (shift applied), or DDIM's tau_k then 0."""
        sched = self.scheduler
        sched.set_timesteps(n, **set_timesteps_kwargs)
        conv = self.convention
        if isinstance(conv, FlowConvention):
            return [float(s) for s in sched.sigmas]
        final_one = bool(sched.config.get("set_alpha_to_one", True))
        return conv.grid([int(k) for k in sched.timesteps], final_alpha_one=final_one)

    def decode(self, latents: Tensor) -> Tensor:
        r"""Images from latents through the VAE: ``vae.decode(x / scaling_factor + shift_factor)`` (in [-1, 1]).

        Args:
            latents: Latents of the teacher's event shape, shape (batch, C, H, W).

        Returns:
            Decoded images, float32.

        Raises:
            ValueError: when the folder had no VAE.
        """
        if self.vae is None:
            raise ValueError("this teacher has no VAE (the folder has no 'vae' sub-folder); latents cannot be decoded")
        cfg = self.vae.config
        z = latents / float(cfg.get("scaling_factor", 1.0) or 1.0) + float(cfg.get("shift_factor", 0.0) or 0.0)
        p = next(self.vae.parameters())
        with torch.no_grad():
            return self.vae.decode(z.to(p.dtype), return_dict=False)[0].float()

    def extra_repr(self) -> str:
        return (f"model={type(self.model).__name__}, convention={self.convention}, event_shape={self.event_shape}, "
                f"conditioning={self.conditioner.kind}, num_classes={self.num_classes}")
