r"""Loading diffusers folders and calling their denoisers as fewstep velocity fields.

A folder is either a pipeline saved with ``save_pretrained`` (``model_index.json`` with a ``transformer`` or
``unet`` component, a ``scheduler`` and optionally a ``vae``), a folder with those sub-folders but no
``model_index.json``, or a bare model folder (its ``config.json``) whose scheduler comes from a sibling or
child ``scheduler`` folder or the ``scheduler`` option. Nothing is downloaded: every load is
``from_pretrained(<local folder>)``.

:class:`DiffusersDenoiser` evaluates :math:`v(x, t \mid c)` = ``convention.to_velocity(model(z, k, **c))`` with
(z, k) = ``convention.model_inputs(x, t)`` (see :mod:`fewstep.integrations.diffusers.conventions`).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.integrations.diffusers.conditioning import Conditioner
from fewstep.integrations.diffusers.conventions import FlowConvention, VPConvention

__all__ = ["DiffusersFolder", "resolve_folder", "load_component", "DiffusersDenoiser", "TIMESTEP_EMBEDDERS",
           "event_shape_of", "conditioner_for"]

DENOISERS = ("transformer", "unet")
#: Module-name suffixes of the timestep embedders (``TimestepEmbedding``) of diffusers denoisers: SD3 / Flux /
#: PixArt / DiT ``...timestep_embedder``, U-Nets ``time_embedding``.
TIMESTEP_EMBEDDERS = ("timestep_embedder", "time_embedding")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("the diffusers integration needs the optional extra: "
                          "pip install 'fewstep[diffusers]'") from None
    return diffusers


@dataclass
class DiffusersFolder:
    """Where the denoiser, scheduler and VAE of a folder live (None: absent)."""

    model: Path
    scheduler: Path | None
    vae: Path | None
    component: str


def resolve_folder(path: str | Path, subfolder: str | None = None, scheduler: str | None = None) -> DiffusersFolder:
    """Locate denoiser / scheduler / VAE folders (see the module docstring).

    Args:
        path: The folder given as ``teacher.path``.
        subfolder: Denoiser sub-folder, or None to search ``transformer`` / ``unet`` / the folder itself.
        scheduler: An explicit scheduler folder, or None.

    Returns:
        The located folders.

    Raises:
        ValueError: when the path holds no diffusers model.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"teacher path {str(root)!r} is not a folder (a diffusers save_pretrained folder is needed)")
    if subfolder:
        model = root / subfolder
    elif (root / "config.json").is_file():
        model = root
    else:
        found = [root / c for c in DENOISERS if (root / c / "config.json").is_file()]
        if not found:
            raise ValueError(f"{str(root)!r} holds no diffusers model: expected config.json or a "
                             f"{' / '.join(DENOISERS)} sub-folder")
        model = found[0]
    if not (model / "config.json").is_file():
        raise ValueError(f"{str(model)!r} has no config.json")
    sched = None
    for cand in ([Path(scheduler)] if scheduler else []) + [model / "scheduler", model.parent / "scheduler"]:
        if (cand / "scheduler_config.json").is_file():
            sched = cand
            break
    if scheduler and sched is None:
        raise ValueError(f"scheduler folder {scheduler!r} has no scheduler_config.json")
    vae = model.parent / "vae" if (model.parent / "vae" / "config.json").is_file() and model != root else None
    return DiffusersFolder(model, sched, vae, model.name if model != root else "model")


def load_component(folder: Path, dtype: torch.dtype | None = None, config_name: str = "config.json") -> Any:
    """``<_class_name>.from_pretrained(folder)`` for a model or scheduler folder (class read from its config)."""
    diffusers = _diffusers()
    cfg = json.loads((folder / config_name).read_text())
    name = cfg.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"{str(folder)!r}: unknown diffusers class {name!r} (diffusers {diffusers.__version__})")
    if config_name == "scheduler_config.json":
        return cls.from_pretrained(str(folder))
    kw: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        kw["low_cpu_mem_usage"] = False  # the default needs accelerate (and warns without it)
    model = cls.from_pretrained(str(folder), **kw)
    if dtype is not None and not getattr(cls, "_keep_in_fp32_modules", None):
        model = model.to(dtype)  # diffusers 0.42 without accelerate loads the weights in float32 regardless
    return model


def event_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    """(in_channels, H, W) from the model config's ``in_channels`` and ``sample_size``; None when unknown."""
    cfg = model.config
    c, size = cfg.get("in_channels"), cfg.get("sample_size")
    if c is None or size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(c), int(h), int(w)


def conditioner_for(model: nn.Module, null_class: int | None = None) -> Conditioner:
    """Class-conditional (DiT's ``num_embeds_ada_norm``, U-Nets' ``num_class_embeds``), text (an
    ``encoder_hidden_states`` argument) or unconditional."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    if type(model).__name__ == "DiTTransformer2DModel" and cfg.get("num_embeds_ada_norm"):
        n = int(cfg["num_embeds_ada_norm"])
        return Conditioner("class", n, n if null_class is None else null_class)  # DiT's class-dropout token = n
    if cfg.get("num_class_embeds") and cfg.get("class_embed_type") is None:
        return Conditioner("class", int(cfg["num_class_embeds"]), null_class)
    if "encoder_hidden_states" in params:
        return Conditioner("table")
    return Conditioner("none")


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """GroupNorm pre-hook: forward-mode AD of group_norm needs a contiguous input (its tangent is viewed)."""
    return (args[0].contiguous(),) + tuple(args[1:])


class DiffusersDenoiser(nn.Module):
    """A diffusers denoiser with its time convention and conditioning: ``velocity(x, t, cond)``.

    Args:
        model: The diffusers model (``ModelMixin``).
        convention: :class:`FlowConvention` or :class:`VPConvention`.
        conditioner: How ``cond`` ids become model keyword arguments.
        embedded_guidance: Guidance-distilled models (Flux-dev's ``guidance_embeds``): the guidance value fed to
            the model's guidance embedder.
    """

    def __init__(self, model: nn.Module, convention: FlowConvention | VPConvention, conditioner: Conditioner,
                 embedded_guidance: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.convention = convention
        self.conditioner = conditioner
        self.embedded_guidance = embedded_guidance
        self.packed = type(model).__name__.startswith("Flux")
        if self.packed and model.config.get("guidance_embeds") and embedded_guidance is None:
            raise ValueError(f"{type(model).__name__} is guidance-distilled (guidance_embeds): set "
                             "teacher.kwargs.embedded_guidance (e.g. 3.5)")
        self._accepts = set(inspect.signature(model.forward).parameters)
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and _contiguous_input not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_contiguous_input)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def raw(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The model's native output at the convention's (z, k) for x at time t (learned-variance halves dropped)."""
        z, k = self.convention.model_inputs(x, t)
        dt = self.dtype
        kw = self.conditioner.kwargs(cond, x.shape[0], x.device, dt)
        unknown = set(kw) - self._accepts
        if unknown:
            raise ValueError(f"{type(self.model).__name__}.forward takes no argument(s) {sorted(unknown)} "
                             "(check the tensor names of the condition folder)")
        if self.packed:
            out = self._packed_call(z.to(dt), k, kw)
        else:
            out = self.model(z.to(dt), timestep=k, return_dict=False, **kw)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (DiT, IDDPM U-Nets): keep the mean prediction
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"{type(self.model).__name__} returned shape {tuple(out.shape)} for input "
                             f"{tuple(x.shape)}")
        return out.to(x.dtype)

    def _packed_call(self, z: Tensor, k: Tensor, kw: dict) -> Tensor:
        """Flux: 2x2 patches packed into tokens (FluxPipeline._pack_latents), position ids, optional guidance."""
        b, c, h, w = z.shape
        tokens = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        ids = torch.zeros(h // 2, w // 2, 3, device=z.device, dtype=z.dtype)
        ids[..., 1] += torch.arange(h // 2, device=z.device, dtype=z.dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=z.device, dtype=z.dtype)[None, :]
        ehs = kw.get("encoder_hidden_states")
        n_txt = 0 if ehs is None else ehs.shape[1]
        extra = {"img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(n_txt, 3, device=z.device, dtype=z.dtype)}
        if self.model.config.get("guidance_embeds"):
            extra["guidance"] = torch.full((b,), float(self.embedded_guidance), device=z.device, dtype=torch.float32)
        out = self.model(tokens, timestep=k, return_dict=False, **kw, **extra)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """v(x, t | cond) on fewstep's linear path."""
        return self.convention.to_velocity(self.raw(x, t, cond), x, t)
