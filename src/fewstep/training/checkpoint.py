r"""Atomic, pickle-free checkpoints: a folder of safetensors weights + JSON state, sealed by checksums.

Layout of one checkpoint (``run_dir/ckpt-<step>/``)::

    tensors.safetensors   every tensor by name (student, EMA copies, auxiliary nets, optimiser moments)
    state.json            everything else (step, RNG states as lists, scheduler state, scalar optimiser state)
    COMPLETE              {"files": {name: sha256}}, written last

Every file is written to a temporary file in the same folder, flushed, ``fsync``-ed and moved into place with
``os.replace``. A checkpoint counts only if ``COMPLETE`` exists and every checksum matches, so a run killed at
any moment (SIGKILL included) leaves either a valid checkpoint or one that :func:`load_latest` reports with a
warning naming the bad file and skips, falling back to the previous good one. Nothing is ever unpickled: nested
state with tensors (optimiser states) is split into named tensors and a JSON skeleton by
:mod:`fewstep.training.tensor_tree` (:func:`flatten_tensors` / :func:`unflatten_tensors`, re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fewstep.core.io import atomic_write, atomic_write_bytes, fsync_dir
from fewstep.training.fsdp import full_tensor, load_full_state_dict, shard_optimizer_state
from fewstep.training.optim import lr_factor
from fewstep.training.tensor_tree import flatten_tensors, unflatten_tensors

__all__ = ["save_checkpoint", "load_checkpoint", "load_latest", "list_checkpoints", "prune_checkpoints",
           "verify_checkpoint", "atomic_write_bytes", "sha256_file", "CheckpointError", "flatten_tensors",
           "unflatten_tensors", "trainer_state", "restore_trainer_state", "clear_run", "METHOD_PREFIX",
           "method_tensors", "check_run_dir"]

TENSORS, STATE, COMPLETE = "tensors.safetensors", "state.json", "COMPLETE"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
METHOD_PREFIX = "method/"  #: key prefix of the method's state dict among a checkpoint's tensors


def method_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The method's state dict from a checkpoint's tensors: the keys under :data:`METHOD_PREFIX`, prefix removed."""
    n = len(METHOD_PREFIX)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)}


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, truncated or corrupted."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp)))


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any],
                    keep: int | None = None) -> Path:
    """Write ``run_dir/ckpt-<step>/`` atomically and seal it with a ``COMPLETE`` checksum file.

    Args:
        run_dir: Run folder (created if needed).
        step: Number of completed training steps.
        tensors: Named tensors (saved with safetensors).
        state: JSON-serialisable state.
        keep: If given, delete all but the newest ``keep`` checkpoints afterwards.

    Returns:
        The checkpoint folder.
    """
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    folder = Path(run_dir) / f"ckpt-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / COMPLETE
    if marker.exists():
        marker.unlink()  # re-sealed below; never leave a marker over files being rewritten
        fsync_dir(folder)
    _atomic_save_tensors(folder / TENSORS, tensors)
    atomic_write_bytes(folder / STATE, json.dumps(state, indent=1, sort_keys=True).encode())
    sums = {name: sha256_file(folder / name) for name in (TENSORS, STATE)}
    atomic_write_bytes(marker, json.dumps({"step": step, "files": sums}, indent=1).encode())
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return folder


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """All ``ckpt-<step>`` folders of a run (complete or not), newest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return sorted(out, reverse=True)


def verify_checkpoint(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file when a checkpoint is incomplete or corrupted."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: no {COMPLETE} marker "
                              "(the run was probably killed while writing it)")
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint marker {str(marker)!r} is unreadable: {e}") from e
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {str(p)!r} is missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint file {str(p)!r} is truncated or corrupted (sha256 mismatch)")


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verify and load one checkpoint folder; returns (tensors, state)."""
    verify_checkpoint(folder)
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / TENSORS), device=str(device))
        state = json.loads((folder / STATE).read_text())
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {str(folder)!r} could not be read: {e}") from e
    return tensors, state


def load_latest(run_dir: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[int, dict[str, Tensor], dict[str, Any]] | None:
    """The newest complete, checksum-valid checkpoint of a run as (step, tensors, state), or None.

    Invalid checkpoints are reported with a ``UserWarning`` naming the problem file and skipped.
    """
    for step, folder in list_checkpoints(run_dir):
        try:
            tensors, state = load_checkpoint(folder, device)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", UserWarning, stacklevel=2)
            continue
        return step, tensors, state
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (and incomplete ones older than those)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed: list[Path] = []
    complete = 0
    for _, folder in list_checkpoints(run_dir):
        if (folder / COMPLETE).is_file():
            complete += 1
            if complete <= keep:
                continue
        elif complete < keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def clear_run(run_dir: str | Path) -> list[Path]:
    """Remove a previous run's checkpoints, ``metrics.csv``, ``evals.jsonl``, ``eval.json`` and ``tb/`` from a folder
    (``fewstep distill --overwrite``); other files are kept. Returns what was removed."""
    root = Path(run_dir)
    removed = [folder for _, folder in list_checkpoints(root)]
    for folder in removed:
        shutil.rmtree(folder)
    for name in ("metrics.csv", "evals.jsonl", "eval.json"):
        if (root / name).is_file():
            (root / name).unlink()
            removed.append(root / name)
    if (root / "tb").is_dir():
        shutil.rmtree(root / "tb")
        removed.append(root / "tb")
    return removed


def trainer_state(trainer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Everything a :class:`~fewstep.training.trainer.Trainer` needs to continue bit-exactly, as (tensors, JSON state).

    Tensors: ``method/<key>`` (student, auxiliary and target nets, buffers), ``ema/<decay>/<key>``,
    ``optim/<net>/state/<idx>/<name>``. JSON: step, seed, optimiser skeletons (param groups, scalar state),
    scheduler state (base LR and step), EMA update count, AMP scaler state, RNG states as lists, run config.
    """
    tensors: dict[str, Tensor] = {METHOD_PREFIX + k: v for k, v in trainer.method.state_dict().items()}
    if trainer.ema is not None:
        for d, m in trainer.ema.copies.items():
            tensors.update({f"ema/{d!r}/{k}": v for k, v in m.state_dict().items()})
    optim = {n: flatten_tensors(o.state_dict(), f"optim/{n}", tensors) for n, o in trainer.optimizers.items()}
    tensors = {k: full_tensor(v) for k, v in tensors.items()}  # FSDP: all-gather sharded tensors (every rank)
    py = random.getstate()
    state = {
        "step": trainer.step, "seed": trainer.seed, "world_size": trainer.world, "optim": optim,
        "schedulers": {n: {"base_lr": trainer.base_lrs[n], "step": trainer.step,
                           "factor": lr_factor(max(trainer.step - 1, 0), trainer.config)} for n in trainer.nets},
        "ema": {"decays": trainer.ema.decays, "num_updates": trainer.ema.num_updates} if trainer.ema else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "rng": {"torch": torch.random.get_rng_state().tolist(), "python": [py[0], list(py[1]), py[2]],
                "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []},
        "config": trainer.run_config,
    }
    return tensors, state


def restore_trainer_state(trainer: Any, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Inverse of :func:`trainer_state`: load weights, EMA, optimisers, scaler, RNG states and the step."""
    load_full_state_dict(trainer.method, method_tensors(tensors))
    if trainer.ema is not None and state.get("ema"):
        for d, m in trainer.ema.copies.items():
            pre = f"ema/{d!r}/"
            m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        trainer.ema.num_updates = int(state["ema"]["num_updates"])
    for n, o in trainer.optimizers.items():
        if n not in state["optim"]:
            raise CheckpointError(f"checkpoint has no optimiser state for network {n!r}")
        sd = unflatten_tensors(state["optim"][n], tensors)
        for g in sd["param_groups"]:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        o.load_state_dict(shard_optimizer_state(o, sd))
    if trainer.scaler is not None and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.random.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
    trainer.step = int(state["step"])


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Create ``run_dir`` and fail early when it is not writable or already holds another run's checkpoints.

    Args:
        run_dir: The run folder (created if missing).
        resume: Whether existing checkpoints are to be continued rather than rejected.

    Raises:
        FileExistsError: checkpoints exist and ``resume`` is False (the new run's checkpoints would be pruned in
            favour of the old ones with higher step numbers, and ``fewstep eval`` would report the old run).
        PermissionError: the folder cannot be created or written.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {str(run_dir)!r} is a file")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise PermissionError(f"run folder {str(run_dir)!r} is not writable") from None
    if not resume:
        old = list_checkpoints(run_dir)
        if old:
            raise FileExistsError(f"run folder {str(run_dir)!r} already holds checkpoints (newest ckpt-{old[0][0]}); "
                                  "pass --resume to continue that run, --overwrite to replace it, or another --run-dir")
