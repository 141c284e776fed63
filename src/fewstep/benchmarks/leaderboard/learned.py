r"""Learned-teacher targets: a velocity teacher trained by ``fewstep train-teacher`` on real digits, cached by hash.

A learned target is ``learned:<config.yaml>`` (a ``fewstep train-teacher`` config on the real ``digits`` data) or
an alias of one: ``learned-digits`` = ``configs/teacher_digits_bench.yaml`` (unconditional, MLP 256×3, 8000 steps).
The teacher is trained once as ``fewstep train-teacher --config`` trains it (:func:`fewstep.config.build.build_run`,
resolved config saved beside it; seeded, one thread: deterministic) into ``<cache>/<config stem>-<hash>``, where
the hash is that of the resolved config, so a changed config trains a new teacher and an unchanged one is loaded.
``<cache>`` is ``$FEWSTEP_BENCH_TEACHERS``, default ``runs/bench-teachers`` (relative to the working directory, like
the other bench folders). The cells distil it as ``teacher.kind=run`` (:func:`fewstep.config.build.build_teacher`:
the EMA student wrapped by :meth:`~fewstep.teachers.module.ModuleTeacher.from_flowmap`; methods that need scores or
x0 convert the learned velocity, no analytic shortcut), with the teacher's own training data as ``data``.

Quality is measured against real held-out digits (the test split of the teacher's data section, never trained on):
MMD² and the Fréchet distance in the digit-classifier features, the metrics of the 64-D ``digits`` target.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.leaderboard.cached_run import train_run_folder
from fewstep.config.schema import RunConfig, load_config, to_dict

__all__ = [
    "LEARNED_PREFIX",
    "LEARNED_ALIASES",
    "is_learned_target",
    "teacher_config",
    "teacher_cache",
    "teacher_dir",
    "ensure_teacher",
    "load_learned_teacher",
    "real_reference",
    "learned_overrides",
]

LEARNED_PREFIX = "learned:"
_ROOT = Path(__file__).resolve().parents[4]
#: Named learned targets: the ``fewstep train-teacher`` config each one trains (relative to the repository root).
LEARNED_ALIASES: dict[str, str] = {"learned-digits": "configs/teacher_digits_bench.yaml"}


def is_learned_target(name: str) -> bool:
    """Whether ``name`` is a learned-teacher target (an alias or ``learned:<config>``)."""
    return name in LEARNED_ALIASES or name.startswith(LEARNED_PREFIX)


def _config_path(name: str) -> Path:
    if name in LEARNED_ALIASES:
        return _ROOT / LEARNED_ALIASES[name]
    path = Path(name[len(LEARNED_PREFIX) :])
    if not path.is_file():
        raise ValueError(f"learned target {name!r}: no teacher config file {str(path)!r} (learned:<config.yaml>)")
    return path


def teacher_config(name: str) -> RunConfig:
    """The resolved ``train-teacher`` config of a learned target, checked to be a digits velocity teacher.

    Args:
        name: Learned target name.

    Returns:
        The run config ``fewstep train-teacher --config`` would load.

    Raises:
        ValueError: for a config that is not unconditional flow matching on ``digits`` with a velocity student.
    """
    cfg = load_config(_config_path(name), base={"method": {"name": "flow_matching"}})
    kw = dict(cfg.data.kwargs)
    problems = [
        f"method {cfg.method.name!r} (needs flow_matching)" if cfg.method.name != "flow_matching" else "",
        f"data {cfg.data.name!r} (needs digits)" if cfg.data.name != "digits" else "",
        "data.kwargs.conditional must be false" if kw.get("conditional", True) else "",
        "data.kwargs.split must be train" if kw.get("split", "train") != "train" else "",
        "data.kwargs.image must be false" if kw.get("image", False) else "",
        "student.parameterization must be velocity" if cfg.student.parameterization != "velocity" else "",
    ]
    if any(problems):
        raise ValueError(f"learned target {name!r}: " + "; ".join(p for p in problems if p))
    return cfg


def teacher_cache() -> Path:
    """The teacher cache folder: ``$FEWSTEP_BENCH_TEACHERS`` or ``runs/bench-teachers``."""
    return Path(os.environ.get("FEWSTEP_BENCH_TEACHERS", "runs/bench-teachers"))


def config_hash(cfg: RunConfig) -> str:
    """First 12 hex digits of the SHA-256 of the resolved config (sorted JSON)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_dir(name: str) -> Path:
    """The run folder of a learned target's teacher: ``<cache>/<config stem>-<config hash>``."""
    return teacher_cache() / f"{_config_path(name).stem}-{config_hash(teacher_config(name))}"


def ensure_teacher(name: str) -> Path:
    """Train the teacher of a learned target unless its cached run folder exists; returns the folder.

    Training is what ``fewstep train-teacher --config <config> --run-dir <tmp> --threads 1 --device cpu`` does
    (:func:`~fewstep.benchmarks.leaderboard.cached_run.train_run_folder`: the resolved config saved as
    ``config.yaml``), in this process; the finished folder is renamed into place, so a cut-off training leaves no
    cache entry.

    Args:
        name: Learned target name.

    Returns:
        The teacher's run folder (:func:`teacher_dir`).

    Raises:
        RuntimeError: when the training command fails.
    """
    out = teacher_dir(name)
    if out.is_dir():
        return out
    try:
        train_run_folder(teacher_config(name), out, threads=1)
    except Exception as e:
        raise RuntimeError(f"training the teacher of {name!r} ({_config_path(name)}) failed: {e}") from e
    return out


def load_learned_teacher(name: str) -> Any:
    """The teacher of a learned target exactly as a cell builds it (``teacher.kind=run``), trained if needed."""
    from fewstep.config.build import build_teacher
    from fewstep.config.schema import TeacherConfig

    return build_teacher(TeacherConfig(kind="run", path=str(ensure_teacher(name))))


def real_reference(name: str, split: str = "test") -> torch.Tensor:
    """Real digits of the teacher's data section (``test``: held out from its training), float64, (N, 64)."""
    from fewstep.data.datasets import get_dataset

    cfg = teacher_config(name)
    kw = {**dict(cfg.data.kwargs), "split": split, "conditional": False}
    return get_dataset(cfg.data.name, **kw).tensors()[0].to(torch.float64)


def learned_overrides(name: str) -> list[str]:
    """Cell overrides for a learned target: its cached run folder as the teacher, its training data as data."""
    cfg = teacher_config(name)
    kw = json.dumps(dict(cfg.data.kwargs), sort_keys=True)
    return [
        "teacher.kind=run",
        f"teacher.path={teacher_dir(name)}",
        "teacher.conditional=false",
        "teacher.guidance=1.0",
        f"data.name={cfg.data.name}",
        f"data.kwargs={kw}",
    ]
