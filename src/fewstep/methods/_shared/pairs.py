r"""Reflow pairs: noise x1 ~ N(0, I) and the teacher's ODE endpoint x0 = Phi_T(x1; 1 -> 0), cached on disk.

The coupling (x1, x0 = ODE_T(x1)) is the training set of reflow (docs/methods.md §3): the k-rectified flow
regresses :math:`E\|v_\theta(x_t,t) - (x_1 - x_0)\|^2` on it, and "+distill" regresses
:math:`\|f_\theta(x_1, 1, 0) - x_0\|^2`.

Storage: a folder of safetensors shards ``pairs_00000.safetensors`` (tensors ``x1``, ``x0`` and, for a
class-conditional teacher, ``cond``) plus ``manifest.json`` recording the teacher fingerprint, the solver
settings, the seed, the guidance weight and the shard list. Shard i is generated from its own generator
seeded with ``seed * 1_000_003 + i``, so an interrupted generation resumes shard by shard and produces the
same bytes as an uninterrupted one. Loading with a different teacher fingerprint or different solver
settings raises :class:`StalePairsError` unless ``allow_stale=True``: stale pairs are never reused silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.io import atomic_write, atomic_write_text
from fewstep.sampling.samplers import ODE_METHODS, solve, solve_adaptive
from fewstep.teachers.base import as_velocity_fn
from fewstep.teachers.fingerprint import teacher_fingerprint

__all__ = ["PairSolver", "Pairs", "StalePairsError", "generate_pairs", "load_pairs", "ensure_pairs", "FORMAT"]

FORMAT = "fewstep-pairs-v1"
SOLVERS: tuple[str, ...] = (*ODE_METHODS, "adaptive")


class StalePairsError(ValueError):
    """Cached pairs were made by a different teacher or solver than the one requested."""


@dataclass(frozen=True)
class PairSolver:
    """How the teacher ODE is solved from t=1 to t=0.

    Attributes:
        method: ``euler``, ``heun``, ``rk4`` (fixed uniform grid) or ``adaptive`` (dopri5).
        steps: Number of steps of a fixed-step solve (ignored for adaptive).
        rtol: Relative tolerance of the adaptive solve.
        atol: Absolute tolerance of the adaptive solve.
    """

    method: str = "rk4"
    steps: int = 32
    rtol: float = 1e-5
    atol: float = 1e-5

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown pair solver {self.method!r}; expected one of {SOLVERS}")
        if self.method != "adaptive" and int(self.steps) < 1:
            raise ValueError(f"pair solver steps must be >= 1, got {self.steps}")

    def spec(self) -> dict[str, Any]:
        """The settings that determine the pairs (fixed-step solves ignore tolerances and vice versa)."""
        if self.method == "adaptive":
            return {"method": "adaptive", "rtol": float(self.rtol), "atol": float(self.atol)}
        return {"method": self.method, "steps": int(self.steps)}


@dataclass
class Pairs:
    """An in-memory reflow coupling: ``x1`` noise, ``x0`` teacher endpoints, optional ``cond`` labels."""

    x1: Tensor
    x0: Tensor
    cond: Tensor | None
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return self.x1.shape[0]

    def take(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Select pairs by uniforms ``u`` in [0, 1): index = floor(u * N) (reproducible across ranks)."""
        idx = (u * len(self)).long().clamp_(0, len(self) - 1).cpu()
        c = self.cond[idx] if self.cond is not None else None
        return self.x1[idx], self.x0[idx], c


def _solve_teacher(v_fn: Callable[..., Tensor], x1: Tensor, cond: Tensor | None, solver: PairSolver) -> Tensor:
    """x0 = x1 + int_1^0 v(x_t, t) dt with the configured solver."""
    if solver.method == "adaptive":
        return solve_adaptive(v_fn, x1, 1.0, 0.0, rtol=solver.rtol, atol=solver.atol, cond=cond).x
    return solve(v_fn, x1, int(solver.steps), method=solver.method, cond=cond).x


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def _expected(fingerprint: dict[str, str], solver: PairSolver, seed: int, guidance: float,
              event_shape: tuple[int, ...], num_classes: int | None, uncond_fraction: float) -> dict[str, Any]:
    return {"format": FORMAT, "teacher": fingerprint, "solver": solver.spec(), "seed": int(seed),
            "guidance": float(guidance), "event_shape": list(event_shape), "num_classes": num_classes,
            "uncond_fraction": float(uncond_fraction)}


def _check_manifest(found: dict[str, Any], want: dict[str, Any], folder: Path) -> None:
    """Raise StalePairsError naming every field that differs (path of the teacher is informational)."""
    diffs = []
    for key, val in want.items():
        old = found.get(key)
        if key == "teacher":
            old = {k: v for k, v in (old or {}).items() if k != "path"}
            val = {k: v for k, v in val.items() if k != "path"}
        if old != val:
            diffs.append(f"{key}: cached {old!r} vs requested {val!r}")
    if diffs:
        raise StalePairsError(f"pairs in {folder} do not match the requested teacher/solver ("
                              + "; ".join(diffs) + "); delete the folder, use another pair_dir, "
                              "or pass allow_stale=True to reuse them knowingly")


def generate_pairs(teacher: Any, folder: str | Path, n: int, solver: PairSolver | None = None, seed: int = 0,
                   shard_size: int = 4096, batch_size: int = 4096, guidance: float = 1.0,
                   uncond_fraction: float = 0.0, fingerprint: dict[str, str] | None = None,
                   event_shape: tuple[int, ...] | None = None, progress: bool = True,
                   allow_stale: bool = False) -> Pairs:
    r"""Generate (or resume generating) ``n`` pairs (x1, x0 = ODE_T(x1; 1 -> 0)) into ``folder``.

    Labels (class-conditional teachers) are uniform over classes, with a fraction ``uncond_fraction`` set to
    -1 (unconditional); the endpoint uses the guided field :math:`v_u + w(v_c - v_u)`.

    Args:
        teacher: Teacher, or a previous student (k-rectified flow) with ``velocity(x, t, cond)``.
        folder: Output folder (created).
        n: Number of pairs (> 0).
        solver: ODE solver settings.
        seed: Base seed; shard i uses seed * 1_000_003 + i.
        shard_size: Pairs per shard file.
        batch_size: Teacher batch size inside a shard.
        guidance: CFG weight w.
        uncond_fraction: Fraction of unconditional (-1) labels for a conditional teacher.
        fingerprint: Teacher identity (default :func:`teacher_fingerprint`).
        event_shape: Sample shape (default ``teacher.event_shape``).
        progress: Show a tqdm bar.
        allow_stale: Resume into a folder whose manifest differs (not recommended).

    Returns:
        The complete :class:`Pairs`.
    """
    from tqdm.auto import tqdm

    if n < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"n, shard_size and batch_size must be >= 1; got {n}, {shard_size}, {batch_size}")
    if not 0.0 <= uncond_fraction <= 1.0:
        raise ValueError(f"uncond_fraction must lie in [0, 1]; got {uncond_fraction}")
    solver = solver or PairSolver()
    shape = tuple(event_shape or getattr(teacher, "event_shape", ()) or ())
    if not shape:
        raise ValueError("event_shape is unknown: the teacher has no event_shape attribute; pass event_shape=")
    num_classes = getattr(teacher, "num_classes", None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    want = _expected(fingerprint or teacher_fingerprint(teacher), solver, seed, guidance, shape, num_classes,
                     uncond_fraction)
    mpath = folder / "manifest.json"
    manifest: dict[str, Any] = {**want, "n": int(n), "shard_size": int(shard_size), "shards": [],
                                "complete": False}
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if not allow_stale:
            _check_manifest(old, want, folder)
        if old.get("shard_size") != shard_size:
            raise StalePairsError(f"pairs in {folder} use shard_size {old.get('shard_size')}, requested {shard_size}")
        manifest["shards"] = [s for s in old.get("shards", []) if (folder / s["file"]).exists()]
    v_fn = as_velocity_fn(teacher, guidance)
    n_shards = math.ceil(n / shard_size)
    sizes = {i: min(shard_size, n - i * shard_size) for i in range(n_shards)}
    # a shard is reusable only if it holds exactly the rows this n asks for (the last one may be partial)
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] >= n_shards or s["n"] == sizes[s["index"]]]
    done = {s["index"] for s in manifest["shards"]}
    from safetensors.torch import save_file

    bar = tqdm(total=n, desc="reflow pairs", disable=not progress, unit="pair")
    bar.update(sum(s["n"] for s in manifest["shards"] if s["index"] < n_shards))
    for i in range(n_shards):
        if i in done:
            continue
        m = sizes[i]
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        x1 = torch.randn((m, *shape), generator=gen)
        cond = None
        if num_classes:
            cond = torch.randint(0, num_classes, (m,), generator=gen)
            drop = torch.rand(m, generator=gen) < uncond_fraction
            cond = torch.where(drop, torch.full_like(cond, -1), cond)
        x0 = torch.empty_like(x1)
        with torch.no_grad():
            for j in range(0, m, batch_size):
                sl = slice(j, j + batch_size)
                x0[sl] = _solve_teacher(v_fn, x1[sl], None if cond is None else cond[sl], solver).to(x0.dtype)
                bar.update(x1[sl].shape[0])
        if not bool(torch.isfinite(x0).all()):
            raise FloatingPointError(f"teacher ODE produced non-finite endpoints in shard {i}")
        tensors = {"x1": x1.contiguous(), "x0": x0.contiguous()}
        if cond is not None:
            tensors["cond"] = cond
        fname = f"pairs_{i:05d}.safetensors"
        atomic_write(folder / fname, lambda p, tensors=tensors: save_file(tensors, str(p)))
        manifest["shards"].append({"index": i, "file": fname, "n": m})
        manifest["shards"].sort(key=lambda s: s["index"])
        _write_json_atomic(mpath, manifest)
    bar.close()
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] < n_shards]
    manifest["n"], manifest["complete"] = int(n), True
    _write_json_atomic(mpath, manifest)
    return load_pairs(folder, fingerprint=want["teacher"], solver=solver, allow_stale=True, n=n)


def load_pairs(folder: str | Path, teacher: Any = None, fingerprint: dict[str, str] | None = None,
               solver: PairSolver | None = None, allow_stale: bool = False, n: int | None = None,
               **expected: Any) -> Pairs:
    """Load cached pairs, refusing stale ones.

    Args:
        folder: Folder written by :func:`generate_pairs`.
        teacher: If given, its fingerprint must match the manifest's.
        fingerprint: Explicit fingerprint to check instead of ``teacher``.
        solver: If given, the solver settings must match.
        allow_stale: Skip the checks (explicit override).
        n: Load only the first n pairs (error if fewer are stored).
        **expected: Further manifest fields to check (seed, guidance, ...).

    Returns:
        The cached pairs: noise x1, teacher endpoints x0, optional labels and the manifest.

    Raises:
        FileNotFoundError: no manifest in ``folder``.
        StalePairsError: teacher, solver or other fields differ, or generation is incomplete.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"no reflow pairs in {folder} (manifest.json missing)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise StalePairsError(f"{mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not allow_stale:
        want: dict[str, Any] = dict(expected)
        if teacher is not None or fingerprint is not None:
            want["teacher"] = fingerprint or teacher_fingerprint(teacher)
        if solver is not None:
            want["solver"] = solver.spec()
        _check_manifest(manifest, want, folder)
        if not manifest.get("complete"):
            raise StalePairsError(f"pair generation in {folder} is incomplete; resume it with generate_pairs")
    from safetensors.torch import load_file

    parts = [load_file(str(folder / s["file"])) for s in sorted(manifest["shards"], key=lambda s: s["index"])]
    if not parts:
        raise StalePairsError(f"{folder} holds no pair shards")
    x1 = torch.cat([p["x1"] for p in parts])
    x0 = torch.cat([p["x0"] for p in parts])
    cond = torch.cat([p["cond"] for p in parts]) if "cond" in parts[0] else None
    if n is not None:
        if x1.shape[0] < n:
            raise StalePairsError(f"{folder} holds {x1.shape[0]} pairs, {n} requested")
        x1, x0, cond = x1[:n], x0[:n], (cond[:n] if cond is not None else None)
    return Pairs(x1=x1, x0=x0, cond=cond, manifest=manifest)


def ensure_pairs(teacher: Any, folder: str | Path, n: int, solver: PairSolver | None = None, seed: int = 0,
                 allow_stale: bool = False, **kwargs: Any) -> Pairs:
    """Load matching pairs from ``folder`` if complete, else generate/resume them (see :func:`generate_pairs`)."""
    solver = solver or PairSolver()
    mpath = Path(folder) / "manifest.json"
    if mpath.exists():
        m = json.loads(mpath.read_text())
        if m.get("complete") and int(m.get("n", 0)) >= n:
            fp = kwargs.get("fingerprint") or teacher_fingerprint(teacher)
            return load_pairs(folder, fingerprint=fp, solver=solver, allow_stale=allow_stale, n=n, seed=int(seed),
                              guidance=float(kwargs.get("guidance", 1.0)))
    return generate_pairs(teacher, folder, n, solver=solver, seed=seed, allow_stale=allow_stale, **kwargs)

