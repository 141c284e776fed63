r"""Read a run folder: its ``config.yaml`` and the weights of its newest valid checkpoint; :class:`LoadedRun`.

:func:`fewstep.config.build.load_run` rebuilds the method from the config (the builders live there, because building
a teacher of ``kind: run`` or a student with ``init_from`` loads another run folder in turn) and then fills it with
:func:`load_run_weights`. This module only reads; it imports nothing from ``build``, so there is no import cycle.

* ``read_run_config``: older run folders stay loadable (keys in :data:`RETIRED_KEYS` dropped, method keys in
  :data:`RENAMED_METHOD_KEYS` renamed, the old method section form normalised).
* ``load_run_weights``: the raw weights go into the method, each EMA copy into a copy of its student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fewstep.config.schema import RunConfig, from_dict, normalize_method_section
from fewstep.core.flowmap import FlowMap
from fewstep.methods.base import Method
from fewstep.sampling.spec import SamplerSpec

__all__ = ["LoadedRun", "RETIRED_KEYS", "RENAMED_METHOD_KEYS", "read_run_config", "load_run_weights"]

#: Keys that older fewstep versions wrote into a run folder's config.yaml and that no longer exist (ignored there).
RETIRED_KEYS: tuple[tuple[str, str], ...] = (("train", "num_workers"),)
#: Method hyper-parameters that older versions wrote under another name (old name -> current name).
RENAMED_METHOD_KEYS: dict[str, str] = {"teacher_guidance": "guidance"}


@dataclass
class LoadedRun:
    """A run folder rebuilt from its ``config.yaml`` and newest valid checkpoint.

    Attributes:
        config: The resolved run config.
        method: The method with the raw (non-EMA) weights loaded.
        teacher: The frozen teacher, or None for methods trained without one.
        ema_students: EMA copies of the student by decay (first = the one used for sampling); may be empty.
        step: Training steps completed by the loaded checkpoint.
        sampler: The run's multi-step sampler (config ``sampler`` section, else the method's own).
        run_dir: The folder.
    """

    config: RunConfig
    method: Method
    teacher: nn.Module | None
    ema_students: dict[float, FlowMap]
    step: int
    sampler: SamplerSpec
    run_dir: Path

    def student(self, ema: bool = True) -> FlowMap:
        """The first EMA copy when ``ema`` and one exists, else the raw student; in eval mode."""
        if ema and self.ema_students:
            return next(iter(self.ema_students.values())).eval()
        return self.method.student.eval()


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored in ``run_dir/config.yaml`` (errors name the folder)."""
    from fewstep.config.schema import read_yaml

    root = Path(run_dir)
    if root.is_file():
        raise ValueError(f"{str(root)!r} is a file, not a fewstep run folder")
    if not (root / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(root)!r} is not a fewstep run folder (no config.yaml)")
    data = read_yaml(root / "config.yaml")
    if not isinstance(data, dict):
        raise ValueError(f"{str(root / 'config.yaml')!r} must contain a mapping")
    for section, key in RETIRED_KEYS:  # run folders written before a key was removed stay loadable
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    data = normalize_method_section(data)
    method_cfg = (data.get("method") or {}).get("cfg") if isinstance(data.get("method"), dict) else None
    if isinstance(method_cfg, dict):
        for old, new in RENAMED_METHOD_KEYS.items():
            if old in method_cfg and new not in method_cfg:
                method_cfg[new] = method_cfg.pop(old)
    return from_dict(RunConfig, data)


def load_run_weights(run_dir: str | Path, method: Method,
                     device: str | torch.device = "cpu") -> tuple[int, dict[float, FlowMap]]:
    """Load the newest valid checkpoint of ``run_dir`` into ``method`` and rebuild its EMA students.

    Warnings about skipped (incomplete or corrupt) checkpoints are re-issued at the caller of ``load_run``.

    Args:
        run_dir: The run folder (holds ``ckpt-<step>/`` folders).
        method: The method rebuilt from the folder's config; its raw (non-EMA) weights are replaced.
        device: Device to load the tensors to.

    Returns:
        The checkpoint's step and the EMA copies of the student by decay (in the order the run saved them).

    Raises:
        FileNotFoundError: no checkpoint at all.
        CheckpointError: checkpoints exist but none is complete and valid (each problem is named).
    """
    import copy
    import warnings

    from fewstep.training.checkpoint import CheckpointError, list_checkpoints, load_latest, method_tensors

    root = Path(run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = load_latest(root, device=device)
    if found is None:
        if list_checkpoints(root):
            why = "; ".join(str(w.message) for w in caught)
            raise CheckpointError(f"every checkpoint of run folder {str(root)!r} is incomplete or corrupt ({why})")
        raise FileNotFoundError(f"run folder {str(root)!r} has no checkpoint yet (ckpt-<step>/)")
    for w in caught:
        warnings.warn(str(w.message), UserWarning, stacklevel=3)  # at the caller of load_run
    step, tensors, state = found
    method.load_state_dict(method_tensors(tensors))
    emas: dict[float, FlowMap] = {}
    for d in (state.get("ema") or {}).get("decays", []):
        m = copy.deepcopy(method.student)
        pre = f"ema/{float(d)!r}/"
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        emas[float(d)] = m.eval()
    return int(step), emas
