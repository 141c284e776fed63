"""How :mod:`fewstep.benchmarks.method_bench` builds and trains a method: config, student network, Trainer, timing.

Hyper-parameters: method defaults < ``configs/<method>.yaml`` < ``--set method.key=value train.key=value
student.key=value``; the student is an :class:`fewstep.networks.mlp.MLP` in the method's parameterization, trained
by :class:`fewstep.training.trainer.Trainer` on exact mixture samples. :mod:`fewstep.benchmarks.peers` trains its
fewstep counterparts through the same functions.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from fewstep.core.flowmap import FlowMap
from fewstep.core.utils import set_unregistered
from fewstep.methods.base import Method
from fewstep.methods.registry import get_method
from fewstep.networks.mlp import MLP
from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = ["CONFIG_DIR", "EMBEDDING_KEYS", "parse_overrides", "method_config", "student_options", "build_method",
           "time_steps", "train_method"]

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``section.key=value`` overrides (values read as YAML scalars) into {section: {key: value}}.

    Args:
        items: Override strings such as ``method.lr=1e-3`` or ``student.emb_dim=32``.

    Returns:
        Overrides by section, with keys ``method``, ``train`` and ``student`` (each possibly empty).

    Raises:
        ValueError: for an item without ``=``, without a section, or with an unknown section.
    """
    out: dict[str, dict[str, Any]] = {"method": {}, "train": {}, "student": {}}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like method.key=value, train.key=value or student.key=value")
        key, val = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in out:
            raise ValueError(
                f"unknown override section {section!r} in {item!r}; expected 'method', 'train' or 'student'")
        value = yaml.safe_load(val)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[section][name] = value
    return out


def method_config(name: str, overrides: dict[str, Any], config_dir: Path = CONFIG_DIR) -> tuple[Any, dict[str, Any]]:
    """Build the method config: class defaults < ``configs/<name>.yaml`` (method section) < command-line overrides.

    The YAML may hold hyper-parameters under ``method.cfg`` (training-system format) or directly under ``method``
    (minus ``name``).

    Args:
        name: Registered method name; selects ``configs/<name>.yaml``.
        overrides: ``method.*`` overrides from the command line.
        config_dir: Folder holding the per-method YAML files.

    Returns:
        (config object, the train section of the YAML or {}).
    """
    cls = get_method(name)
    params: dict[str, Any] = {}
    path = config_dir / f"{name}.yaml"
    doc = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    sec = doc.get("method", {}) or {}
    params.update({**(sec.get("cfg") or {}), **{k: v for k, v in sec.items() if k not in ("name", "cfg")}})
    params.update(overrides)
    return cls.make_config(**params), dict(doc.get("train", {}) or {})


#: Student-section keys the benchmark takes from ``configs/<name>.yaml`` and ``--set student.key=value``
#: (width and depth come from ``--hidden`` / ``--depth`` so that every method is compared on one network).
EMBEDDING_KEYS = ("emb_dim", "activation", "max_freq", "min_freq", "raw_time")


def student_options(name: str, overrides: dict[str, Any], config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The MLP embedding options: ``student`` section of ``configs/<name>.yaml`` < ``--set student.*`` overrides.

    Args:
        name: Method name; selects ``configs/<name>.yaml``.
        overrides: ``student.*`` overrides from the command line (keys of :data:`EMBEDDING_KEYS`).
        config_dir: Folder holding the per-method YAML files.

    Returns:
        The :data:`EMBEDDING_KEYS` options from the YAML, updated with ``overrides``.

    Raises:
        ValueError: for an override key that is not one of :data:`EMBEDDING_KEYS`.
    """
    unknown = set(overrides) - set(EMBEDDING_KEYS)
    if unknown:
        raise ValueError(f"unknown student override(s) {sorted(unknown)}; valid: {list(EMBEDDING_KEYS)}")
    path = config_dir / f"{name}.yaml"
    doc = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    opts = {k: v for k, v in (doc.get("student", {}) or {}).items() if k in EMBEDDING_KEYS}
    return {**opts, **overrides}


def build_method(name: str, teacher: GaussianMixtureTeacher, cfg: Any, hidden: int, depth: int,
                 **net_options: Any) -> Method:
    """A fresh method with an MLP student in the method's parameterization (s-embedding only for average velocity).

    Args:
        name: Registered method name.
        teacher: The analytic teacher (its ``dim`` sets the network's width in and out).
        cfg: The method config (from :func:`method_config`).
        hidden: MLP hidden width.
        depth: MLP depth.
        **net_options: Passed to :class:`fewstep.networks.mlp.MLP` (e.g. ``max_freq``, ``min_freq``, ``raw_time``).

    Returns:
        The method, holding its student and the teacher.
    """
    cls = get_method(name)
    net = MLP(teacher.dim, hidden=hidden, depth=depth, use_s=cls.parameterization == "average_velocity",
              **net_options)
    return cls(FlowMap(net, cls.parameterization), teacher, cfg)


def _trainer(method: Method, teacher: GaussianMixtureTeacher, train: dict[str, Any], seed: int,
             callbacks: tuple[Any, ...] = ()) -> Any:
    """A :class:`fewstep.training.trainer.Trainer` on exact mixture samples, quiet (no files, no progress bar)."""
    from fewstep.data.datasets import MixtureDataset
    from fewstep.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(**{**train, "progress": False, "tensorboard": False, "eval_every": 0, "ckpt_every": 0,
                         "log_every": max(int(train["steps"]) // 20, 1)})
    return Trainer(method, MixtureDataset(teacher), cfg, run_dir=None, callbacks=callbacks, seed=seed)


def time_steps(method: Method, teacher: GaussianMixtureTeacher, train: dict[str, Any], n: int = 30,
               warmup: int = 5) -> float:
    """Median wall time (s) of one Trainer iteration over ``n`` iterations (after ``warmup``) of a deep copy.

    ``method.prepare`` (e.g. reflow's pair generation) runs before the timed loop and is not counted.

    Args:
        method: The method to time; a deep copy is trained, ``method`` itself is left untouched.
        teacher: The analytic teacher (also the data source).
        train: TrainConfig fields (``steps`` is replaced by ``warmup + n``).
        n: Number of timed iterations.
        warmup: Number of untimed iterations first.

    Returns:
        The median seconds per iteration.
    """
    from fewstep.training.callbacks import Callback

    class Stamps(Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_fit_start(self, trainer: Any) -> None:
            self.t.append(time.perf_counter())

        def on_step_end(self, trainer: Any, step: int, logs: dict[str, float]) -> None:
            self.t.append(time.perf_counter())

    m = copy.deepcopy(method)
    set_unregistered(m, "teacher", method.teacher)
    stamps = Stamps()
    _trainer(m, teacher, {**train, "steps": warmup + n}, 0, (stamps,)).fit()
    return statistics.median(b - a for a, b in list(zip(stamps.t, stamps.t[1:]))[warmup:])


def train_method(method: Method, teacher: GaussianMixtureTeacher, train: dict[str, Any],
                 seed: int) -> tuple[FlowMap, list[float]]:
    """Train ``method`` with the Trainer on exact mixture samples.

    Args:
        method: The method to train (in place).
        teacher: The analytic teacher (also the data source).
        train: TrainConfig fields.
        seed: Trainer seed.

    Returns:
        (EMA student, logged mean student losses).
    """
    trainer = _trainer(method, teacher, train, seed)
    trainer.fit()
    losses = [v for row in trainer.history for k, v in row.items() if k == "student/loss"]
    return trainer.student(ema=True), losses
