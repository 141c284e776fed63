r"""Typed run configs: dataclasses loaded from YAML, with dotted command-line overrides.

A run is described by one :class:`RunConfig` with the sections ``seed``, ``device``, ``teacher``, ``data``,
``student``, ``method``, ``train`` and ``eval``. Loading is strict: every key must be a known field of its
section (``unknown config key 'train.lrr'``) and every value must have the field's type
(``config key 'train.steps' must be an int, got 'ten'``). Overrides are ``section.key=value`` strings whose
values are parsed as YAML (``train.lr=1e-3``, ``train.ema_decays=[0.99,0.999]``,
``method.cfg.norm_p=0.75``). The free-form ``method.cfg`` dict is checked against the method's own
config dataclass by :func:`fewstep.config.build.build_method` (``Method.make_config``).

Example:
    >>> cfg = load_config(None, ["train.steps=200", "method.name=flow_matching"])
    >>> cfg.train.steps
    200
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fewstep.config.typed import check_value, from_dict, to_dict

__all__ = [
    "TeacherConfig", "DataConfig", "StudentConfig", "MethodSection", "TrainConfig", "EvalConfig", "SamplerConfig",
    "RunConfig", "MIN_EVAL_SAMPLES",
    "from_dict", "to_dict", "load_config", "read_yaml", "normalize_method_section", "apply_overrides", "save_config",
    "check_value",
]

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
AMP_MODES = ("off", "bf16", "fp16")
TEACHER_KINDS = ("preset", "json", "run", "diffusers")
PARAMETERIZATIONS = ("", "average_velocity", "consistency", "velocity")
ACTIVATIONS = ("silu", "gelu")
STUDENT_KINDS = ("mlp", "unet", "dit", "teacher")  # NETWORK_KINDS + a copy of a diffusers teacher
#: Fewest samples an evaluation may use: below this, MMD² and W2 are dominated by estimator noise.
MIN_EVAL_SAMPLES = 100


@dataclass
class TeacherConfig:
    """Which teacher to distill.

    Attributes:
        kind: ``preset`` (``name`` from fewstep.teachers.presets), ``json`` (a mixture file at ``path``) or
            ``run`` (a teacher trained by ``fewstep train-teacher``; ``path`` is its run folder).
        name: Preset name (kind=preset).
        path: JSON file or run folder (kind=json / run).
        conditional: Load the class-conditional version of the preset.
        guidance: Classifier-free guidance weight w of the teacher velocity (1 = no guidance).
        kwargs: Options of the teacher kind (kind=diffusers: ``DiffusersTeacher.from_pretrained`` options,
            e.g. ``{dtype: bfloat16, subfolder: transformer}``; see docs/diffusers.md).
    """

    kind: str = "preset"
    name: str = "ring8"
    path: str = ""
    conditional: bool = False
    guidance: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training data. ``name="teacher"`` means exact samples x0 ~ p_0 of an analytic teacher.

    Attributes:
        name: Dataset name for ``fewstep.data.datasets.get_dataset`` or ``teacher``.
        kwargs: Keyword arguments of the dataset constructor.
    """

    name: str = "teacher"
    kwargs: dict = field(default_factory=dict)


@dataclass
class StudentConfig:
    """The student backbone (:class:`fewstep.networks.mlp.MLP`) and its flow-map parameterization.

    Attributes:
        hidden: Width of the hidden layers.
        depth: Number of hidden layers.
        emb_dim: Size of each time embedding.
        activation: ``silu`` or ``gelu``.
        max_freq: Largest frequency of the sinusoidal time embeddings (2-8 for JVP students).
        min_freq: Smallest frequency of the sinusoidal time embeddings.
        raw_time: Also feed the raw scalars t and t - s to the network.
        parameterization: ``average_velocity``, ``consistency`` or ``velocity``; empty = the method's default.
        init_from: Optional run folder whose final student weights initialise this student.
        kind: Backbone: ``mlp``, ``unet`` or ``dit`` (images); hidden/depth are its width/depth
            (:func:`fewstep.networks.factory.build_network`).
        options: Kind-specific backbone options, e.g. ``{channel_mult: [1, 2]}`` (unet), ``{patch_size: 2}`` (dit).
    """

    hidden: int = 256
    depth: int = 4
    emb_dim: int = 64
    activation: str = "silu"
    max_freq: float = 32.0
    min_freq: float = 1.0
    raw_time: bool = False
    parameterization: str = ""
    init_from: str = ""
    kind: str = "mlp"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in STUDENT_KINDS:
            raise ValueError(f"invalid value for config key 'student.kind': {self.kind!r}; expected one of "
                             f"{STUDENT_KINDS}")
        for key in ("hidden", "depth", "emb_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"invalid value for config key 'student.{key}': {getattr(self, key)!r}; must be >= 1")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"invalid value for config key 'student.parameterization': {self.parameterization!r}; "
                             f"expected one of {PARAMETERIZATIONS[1:]} (or empty for the method's own)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"invalid value for config key 'student.activation': {self.activation!r}; "
                             f"expected one of {ACTIVATIONS}")
        if not (0 < self.min_freq <= self.max_freq < float("inf")):
            raise ValueError(f"student.min_freq={self.min_freq!r} and student.max_freq={self.max_freq!r} must "
                             "satisfy 0 < min_freq <= max_freq")


@dataclass
class MethodSection:
    """The training method: a registry name and its hyper-parameters (validated by ``Method.make_config``)."""

    name: str = "flow_matching"
    cfg: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation settings used by :class:`fewstep.training.trainer.Trainer`.

    The learning rate at optimizer step k is ``lr * factor(k)`` with a linear warm-up
    ``factor = (k+1)/warmup_steps`` for k < warmup_steps, then ``constant`` (1), ``cosine``
    (``m + (1-m)(1+cos(pi p))/2``) or ``linear`` (``1 - (1-m) p``) where p is the fraction of the post-warm-up
    steps done and m = ``min_lr_ratio``. ``batch_size`` is the GLOBAL batch per optimizer step, split over
    ``grad_accum`` micro-batches and over ranks.

    Attributes:
        steps: Number of optimizer steps (iterations).
        batch_size: Global batch size per step.
        lr: Peak learning rate.
        lr_overrides: Per-network peak learning rates, e.g. ``{fake_score: 2e-4}``.
        weight_decay: Weight decay (decoupled for adamw).
        optimizer: ``adam`` or ``adamw``.
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear warm-up steps.
        lr_schedule: ``constant``, ``cosine`` or ``linear`` after warm-up.
        min_lr_ratio: Final LR as a fraction of the peak (cosine/linear).
        grad_clip: Max global gradient norm per network; 0 disables clipping.
        ema_decays: EMA decays of the student (several allowed; the first is used for sampling).
        ema_warmup: Use decay min(d, (1+n)/(10+n)) after n updates, so short runs are not biased to init.
        grad_accum: Micro-batches per step.
        amp: ``off``, ``bf16`` or ``fp16`` (CUDA only; forced off on CPU).
        log_every: Steps between CSV/TensorBoard rows.
        eval_every: Steps between evaluation callbacks (0 = only at the end).
        ckpt_every: Steps between checkpoints (0 = only at the end, when a run folder is given).
        keep_checkpoints: Number of checkpoints kept.
        progress: Show a tqdm progress bar (only on a TTY and on rank 0).
        tensorboard: Write TensorBoard event files in the run folder.
        fsdp: Shard the student's network with FSDP2 (``fully_shard``) over the torchrun ranks instead of
            replicating it (:mod:`fewstep.training.fsdp`); needs ``ema_decays`` (rank 0 evaluates the full EMA
            copy). A no-op with a warning in a single process.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    lr_overrides: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    optimizer: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decays: list[float] = field(default_factory=lambda: [0.999])
    ema_warmup: bool = True
    grad_accum: int = 1
    amp: str = "off"
    log_every: int = 50
    eval_every: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 3
    progress: bool = True
    tensorboard: bool = True
    fsdp: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key when a value is out of range."""
        checks = [
            ("steps", self.steps >= 0), ("batch_size", self.batch_size >= 1), ("lr", self.lr >= 0),
            ("weight_decay", self.weight_decay >= 0), ("optimizer", self.optimizer in OPTIMIZERS),
            ("warmup_steps", self.warmup_steps >= 0), ("lr_schedule", self.lr_schedule in LR_SCHEDULES),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0), ("grad_clip", self.grad_clip >= 0),
            ("grad_accum", self.grad_accum >= 1), ("amp", self.amp in AMP_MODES),
            ("log_every", self.log_every >= 1), ("eval_every", self.eval_every >= 0),
            ("ckpt_every", self.ckpt_every >= 0), ("keep_checkpoints", self.keep_checkpoints >= 1),
            ("betas", len(self.betas) == 2 and all(0.0 <= float(b) < 1.0 for b in self.betas)),
            ("ema_decays", all(0.0 <= float(d) < 1.0 for d in self.ema_decays)),
        ]
        for key, ok in checks:
            if not ok:
                allowed = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "amp": AMP_MODES}.get(key)
                hint = f"; expected one of {allowed}" if allowed else ""
                raise ValueError(f"invalid value for config key 'train.{key}': {getattr(self, key)!r}{hint}")
        if self.fsdp and not self.ema_decays:
            raise ValueError("train.fsdp=true needs train.ema_decays (rank 0 evaluates and samples the full EMA copy)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} must be divisible by "
                             f"train.grad_accum={self.grad_accum}")


@dataclass
class EvalConfig:
    """Evaluation settings: step counts (NFE; empty = no evaluation callback) and sample size."""

    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    n_samples: int = 2000

    def __post_init__(self) -> None:
        bad = [k for k in self.nfe if k < 1]
        if bad:
            raise ValueError(f"invalid value for config key 'eval.nfe': {self.nfe!r}; every step count must be >= 1 "
                             "(use eval.nfe=[] for no evaluation)")
        if self.n_samples < MIN_EVAL_SAMPLES:
            raise ValueError(f"invalid value for config key 'eval.n_samples': {self.n_samples!r}; must be >= "
                             f"{MIN_EVAL_SAMPLES} (fewer samples make MMD² and W2 estimator noise)")


@dataclass
class SamplerConfig:
    """The multi-step sampler of the student (:class:`fewstep.sampling.spec.SamplerSpec`).

    Empty values mean the method's own (``Method.sampler``); the resolved config of a run folder stores the values
    used, and ``fewstep sample`` / ``fewstep eval`` read them (``--gamma`` / ``--grid`` override).

    Attributes:
        gamma: CTM gamma in [0, 1] (0 = deterministic jumps, 1 = jump to data and re-noise); None = the method's.
        grid: ``uniform`` or ``edm``; empty = the method's.
    """

    gamma: float | None = None
    grid: str = ""

    def __post_init__(self) -> None:
        from fewstep.sampling.spec import GRID_KINDS

        if self.gamma is not None and not (0.0 <= self.gamma <= 1.0):
            raise ValueError(f"invalid value for config key 'sampler.gamma': {self.gamma!r}; must lie in [0, 1]")
        if self.grid and self.grid not in GRID_KINDS:
            raise ValueError(f"invalid value for config key 'sampler.grid': {self.grid!r}; "
                             f"expected one of {GRID_KINDS}")


@dataclass
class RunConfig:
    """A full run: seed, device (``auto`` = cuda when available, ``cpu``, ``cuda:N``) and one section per component."""

    seed: int = 0
    device: str = "auto"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.teacher.kind not in TEACHER_KINDS:
            raise ValueError(f"invalid value for config key 'teacher.kind': {self.teacher.kind!r}; "
                             f"expected one of {TEACHER_KINDS}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value {raw!r} is not valid YAML") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load a :class:`RunConfig` from YAML (or defaults when ``path`` is None) and apply overrides.

    Args:
        path: YAML file; missing sections take their defaults.
        overrides: Dotted ``key=value`` strings applied after the file.
        base: Optional dict applied before the file (e.g. ``{"method": {"name": "reflow"}}``).

    Returns:
        The checked run config.
    """
    data: dict[str, Any] = to_dict(RunConfig()) if base is None else _merge(to_dict(RunConfig()), base)
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"--config {str(p)!r} is a directory, not a YAML file")
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        loaded = read_yaml(p)
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must contain a mapping at the top level")
        for k in loaded:
            if k not in data:
                raise ValueError(f"unknown config key {k!r} in {str(p)!r}; valid sections: {sorted(data)}")
        data = _merge(data, loaded)
    apply_overrides(data, overrides)
    return from_dict(RunConfig, normalize_method_section(data))


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error becomes one ValueError line naming the file, line and column."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"YAML syntax error in {str(p)!r}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(p)!r} is not a text (YAML) file") from None


def normalize_method_section(data: dict[str, Any]) -> dict[str, Any]:
    """Allow hyper-parameters directly under ``method`` (``method: {name: reflow, ma_weight: 0.1}``).

    Every key of the ``method`` section other than ``name`` and ``cfg`` is moved into ``method.cfg``, where
    ``build_method`` checks it against the method's config dataclass.
    """
    m = data.get("method")
    if isinstance(m, dict):
        extra = {k: v for k, v in m.items() if k not in ("name", "cfg")}
        if extra:
            cfg = dict(m.get("cfg") or {})
            cfg.update(extra)
            data = {**data, "method": {"name": m.get("name", MethodSection.name), "cfg": cfg}}
    return data


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (b wins); free-form dicts (method.cfg, data.kwargs) are merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the resolved config of a run folder)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
