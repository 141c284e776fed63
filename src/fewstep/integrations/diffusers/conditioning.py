r"""Conditioning of diffusers teachers: class labels, or rows of a table of precomputed embeddings.

fewstep's batches carry conditioning as one LongTensor ``cond`` of shape (B,) with ``-1`` = unconditional, and
every method indexes, slices, concatenates and nulls it (``cond[idx]``, ``torch.full_like(cond, -1)``) without
knowing what it means. A diffusers teacher keeps that contract and gives the integer a meaning:

* **class-conditional** models (DiT, U-Nets with ``num_class_embeds``): the label itself; ``-1`` becomes the
  model's null class (DiT: ``num_classes``, the class-dropout token; others: ``null_class`` given by the user).
* **text-conditional** models (SD3, U-Nets with cross-attention): the *row* of a :class:`ConditionTable` of
  precomputed embeddings (``encoder_hidden_states``, ``pooled_projections``, ``encoder_attention_mask``,
  ``added_cond_kwargs.<name>`` ...: each tensor is named by the model ``forward`` argument it feeds); ``-1``
  selects the table's null row (the pipeline's empty-prompt embedding, saved by the user). The table is
  resolved inside the teacher and the student network, so text encoders never run during training.

A table is a folder of safetensors shards ``cond-*.safetensors`` (tensors with a common leading size; shards
are concatenated in name order), an optional ``null.safetensors`` (same names, leading size 1) and optional
``latents`` (data x0 in the teacher's latent space, for data-based methods). :func:`save_condition_table`
writes one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["ConditionTable", "Conditioner", "save_condition_table", "ConditionDataset", "LabelDataset",
           "add_teacher_latents"]

LATENTS = "latents"


class ConditionTable:
    """Rows of precomputed conditioning tensors, addressed by integer ids (-1 = the null row).

    Args:
        tensors: Name -> tensor (N, ...); names are model ``forward`` keyword arguments
            (``added_cond_kwargs.text_embeds`` feeds ``added_cond_kwargs={"text_embeds": ...}``).
        null: Name -> tensor (1, ...) or (...) of the unconditional row, or None (then -1 ids are an error).

    Raises:
        ValueError: for an empty table, unequal leading sizes or null tensors that do not match.
    """

    def __init__(self, tensors: Mapping[str, Tensor], null: Mapping[str, Tensor] | None = None) -> None:
        if not tensors:
            raise ValueError("a condition table needs at least one tensor")
        sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"condition tensors must share their leading size; got {sizes}")
        self.tensors = dict(tensors)
        self.size = next(iter(sizes.values()))
        self.null: dict[str, Tensor] | None = None
        if null is not None:
            if set(null) != set(tensors):
                raise ValueError(f"the null row has tensors {sorted(null)} but the table has {sorted(tensors)}")
            self.null = {}
            for k, v in null.items():
                v = v if v.dim() == tensors[k].dim() else v.unsqueeze(0)
                if tuple(v.shape) != (1, *tensors[k].shape[1:]):
                    raise ValueError(f"null tensor {k!r} has shape {tuple(v.shape)}; expected (1, "
                                     f"{', '.join(map(str, tensors[k].shape[1:]))})")
                self.null[k] = v

    def __deepcopy__(self, memo: dict) -> ConditionTable:
        return self  # read-only and shared: EMA copies and fake-score networks must not duplicate it

    def __len__(self) -> int:
        return self.size

    def rows(self, ids: Tensor, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Model keyword arguments for ids (B,), -1 rows taken from the null row; floats cast to ``dtype``."""
        ids = ids.detach().long().cpu()
        if bool(((ids < -1) | (ids >= self.size)).any()):
            raise ValueError(f"condition ids must lie in [-1, {self.size - 1}]")
        null = ids < 0
        if bool(null.any()) and self.null is None:
            raise ValueError("unconditional rows (cond = -1) need a null embedding: save null.safetensors with the "
                             "pipeline's empty-prompt embedding next to the condition shards")
        out: dict[str, Any] = {}
        for k, v in self.tensors.items():
            r = v[ids.clamp(min=0)]
            if self.null is not None and bool(null.any()):
                r = torch.where(null.view(-1, *([1] * (r.dim() - 1))), self.null[k].expand_as(r), r)
            r = r.to(device=device, dtype=dtype if r.is_floating_point() else r.dtype)
            if "." in k:
                outer, inner = k.split(".", 1)
                out.setdefault(outer, {})[inner] = r
            else:
                out[k] = r
        return out

    @classmethod
    def load(cls, folder: str | Path) -> tuple[ConditionTable, Tensor | None]:
        """(table, latents or None) from a folder written by :func:`save_condition_table`."""
        root = Path(folder)
        shards = sorted(root.glob("cond-*.safetensors"))
        if not root.is_dir() or not shards:
            raise ValueError(f"{str(root)!r} is not a condition folder (no cond-*.safetensors shards)")
        parts = [load_file(str(p)) for p in shards]
        names = set(parts[0])
        for p, d in zip(shards, parts, strict=True):
            if set(d) != names:
                raise ValueError(f"shard {p.name} has tensors {sorted(d)}; the first shard has {sorted(names)}")
        merged = {k: torch.cat([d[k] for d in parts]) for k in sorted(names)}
        latents = merged.pop(LATENTS, None)
        null_file = root / "null.safetensors"
        null = load_file(str(null_file)) if null_file.is_file() else None
        if not merged:  # latents only: an unconditional data set
            return None, latents  # type: ignore[return-value]
        return cls(merged, null), latents


def save_condition_table(folder: str | Path, tensors: Mapping[str, Tensor], null: Mapping[str, Tensor] | None = None,
                         latents: Tensor | None = None, shard_size: int = 4096) -> Path:
    """Write ``cond-00000.safetensors``, ... (``shard_size`` rows each) and ``null.safetensors`` into ``folder``.

    Args:
        folder: Output folder (created).
        tensors: Name -> (N, ...) conditioning tensors, named by the model's forward arguments.
        null: The unconditional row (e.g. the pipeline's ``encode_prompt("")``), leading size 1.
        latents: Optional data latents (N, *event_shape) stored with the rows (the data x0 of row i).
        shard_size: Rows per shard.

    Returns:
        The folder.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    all_t = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if latents is not None:
        all_t[LATENTS] = latents.detach().cpu().float().contiguous()
    n = int(next(iter(all_t.values())).shape[0])
    for i, start in enumerate(range(0, n, shard_size)):
        save_file({k: v[start:start + shard_size].contiguous() for k, v in all_t.items()},
                  str(root / f"cond-{i:05d}.safetensors"))
    if null is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in null.items()}, str(root / "null.safetensors"))
    return root


class Conditioner:
    """Turns fewstep's ``cond`` ids into the model's keyword arguments (see the module docstring).

    Args:
        kind: ``none``, ``class`` or ``table``.
        num_classes: Number of classes (kind ``class``).
        null_class: Label fed for ``-1`` rows (kind ``class``), or None.
        table: The :class:`ConditionTable` (kind ``table``; may be attached later).
    """

    def __init__(self, kind: str = "none", num_classes: int | None = None, null_class: int | None = None,
                 table: ConditionTable | None = None) -> None:
        if kind not in ("none", "class", "table"):
            raise ValueError(f"unknown conditioning kind {kind!r}")
        self.kind, self._num_classes, self.null_class, self.table = kind, num_classes, null_class, table

    def __deepcopy__(self, memo: dict) -> Conditioner:
        return Conditioner(self.kind, self._num_classes, self.null_class, self.table)

    @property
    def num_classes(self) -> int | None:
        if self.kind == "class":
            return self._num_classes
        if self.kind == "table":
            return None if self.table is None else len(self.table)
        return None

    def kwargs(self, cond: Tensor | dict | None, batch: int, device: torch.device,
               dtype: torch.dtype) -> dict[str, Any]:
        """Model keyword arguments for ids ``cond`` (None = unconditional for every row).

        A dict ``cond`` is taken as the model's keyword arguments themselves (e.g. ``encoder_hidden_states``
        from a pipeline's ``encode_prompt``): the path for exported students sampled outside a training run.
        """
        if isinstance(cond, dict):
            return {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v) and v.is_floating_point()
                        else v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        if self.kind == "none":
            return {}
        ids = torch.full((batch,), -1, dtype=torch.long) if cond is None else cond
        if self.kind == "class":
            null = ids < 0
            if bool(null.any()):
                if self.null_class is None:
                    raise ValueError("unconditional rows (cond = -1 or guidance) need a null class for this model: "
                                     "set teacher.kwargs.null_class")
                ids = torch.where(null, torch.full_like(ids, self.null_class), ids)
            return {"class_labels": ids.to(device)}
        if self.table is None:
            raise ValueError("this teacher is text-conditional: give it precomputed embeddings with "
                             "data: {name: embeddings, kwargs: {path: <condition folder>}}")
        return self.table.rows(ids, device, dtype)


class LabelDataset:
    """Data-free batches for a diffusers teacher: x0 = None and uniform labels (or None when unconditional)."""

    def __init__(self, event_shape: tuple[int, ...], num_classes: int | None) -> None:
        self.event_shape, self.num_classes = tuple(event_shape), num_classes

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(None, labels uniform in [0, num_classes)) or (None, None)."""
        if self.num_classes is None:
            return None, None
        return None, torch.randint(0, self.num_classes, (n,), generator=generator)


class ConditionDataset:
    """Rows of a condition folder drawn uniformly: (latents[i] or None, i); ``num_classes`` = number of rows."""

    def __init__(self, table: ConditionTable | None, latents: Tensor | None, event_shape: tuple[int, ...]) -> None:
        if latents is not None and tuple(latents.shape[1:]) != tuple(event_shape):
            raise ValueError(f"latents have shape {tuple(latents.shape[1:])} per row but the teacher's latent "
                             f"shape is {tuple(event_shape)}")
        if table is not None and latents is not None and len(latents) != len(table):
            raise ValueError(f"{len(latents)} latents for {len(table)} condition rows")
        self.table, self.latents, self.event_shape = table, latents, tuple(event_shape)
        self.num_classes = None if table is None else len(table)
        self.size = len(table) if table is not None else len(latents)  # type: ignore[arg-type]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor | None, Tensor | None]:
        """n rows drawn with replacement."""
        idx = torch.randint(0, self.size, (n,), generator=generator)
        x0 = None if self.latents is None else self.latents[idx].float()
        return x0, (idx if self.table is not None else None)


@torch.no_grad()
def add_teacher_latents(teacher: Any, folder: str | Path, steps: int = 28, guidance: float = 1.0, seed: int = 0,
                        batch_size: int = 16, **grid_kwargs: Any) -> Path:
    """Give every row of a condition folder a teacher sample as its data latent (for data-based methods).

    Row i gets :math:`x_0^{(i)}` = the teacher's Euler solve of its velocity (guidance w) on its scheduler's
    ``steps``-step grid (``teacher.sampling_grid``) from noise drawn with ``seed``; the folder is rewritten with
    the latents stored next to the rows (``shard_size`` = the first shard's rows).

    Args:
        teacher: A :class:`~fewstep.integrations.diffusers.teacher.DiffusersTeacher` with the folder's table attached.
        folder: The condition folder.
        steps: Teacher sampling steps.
        guidance: CFG weight of the teacher (needs the null row when != 1).
        seed: Seed of the noise.
        batch_size: Rows solved at once.
        **grid_kwargs: Passed to ``set_timesteps`` (e.g. ``mu`` for resolution-dependent shifting).

    Returns:
        The folder.
    """
    from fewstep.sampling.samplers import solve

    table, _ = ConditionTable.load(folder)
    first = load_file(str(sorted(Path(folder).glob("cond-*.safetensors"))[0]))
    shard = int(next(iter(first.values())).shape[0])
    grid = teacher.sampling_grid(steps, **grid_kwargs)
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(len(table), *teacher.event_shape, generator=g)
    p = next(teacher.parameters())
    out = []
    for i in range(0, len(table), batch_size):
        ids = torch.arange(i, min(i + batch_size, len(table)))
        x = x1[ids].to(p.device)
        out.append(solve(teacher.velocity, x, grid, cond=ids.to(p.device), guidance=guidance).x.cpu())
    for f in Path(folder).glob("cond-*.safetensors"):
        f.unlink()
    return save_condition_table(folder, table.tensors, None, latents=torch.cat(out), shard_size=shard)
