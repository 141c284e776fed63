r"""Typed run configs: dataclasses loaded from YAML, with dotted command-line overrides.

A run is described by one :class:`RunConfig` with the sections ``seed``, ``device``, ``teacher``, ``data``,
``student``, ``method``, ``train``, ``eval``, ``sampler`` and the optional ``score_teacher`` (written to a run
folder's ``config.yaml`` only when set). Loading is strict: every key must be a known field of its
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fewstep.config.train import AMP_MODES, LR_SCHEDULES, OPTIMIZERS, TrainConfig
from fewstep.config.typed import OMIT_IF_DEFAULT, check_value, from_dict, to_dict

__all__ = [
    "TeacherConfig", "DataConfig", "StudentConfig", "MethodSection", "TrainConfig", "EvalConfig", "SamplerConfig",
    "RunConfig", "MIN_EVAL_SAMPLES", "OPTIMIZERS", "LR_SCHEDULES", "AMP_MODES",
    "from_dict", "to_dict", "load_config", "read_yaml", "normalize_method_section", "apply_overrides", "save_config",
    "check_value",
]

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
        init_from: Optional run folder whose final student (its first EMA copy, else the raw weights) initialises
            this student and hence its EMA copies (k-rectified flow: round k+1 starts from round k); the
            architectures must match (a mismatch names the first differing tensor).
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
        grid: ``uniform``, ``edm`` or ``power:<p>`` (t_i = (1 - i/K)^p, e.g. ``power:2`` = (1, 0.25, 0) at K = 2;
            :mod:`fewstep.sampling.spec`); empty = the method's.
    """

    gamma: float | None = None
    grid: str = ""

    def __post_init__(self) -> None:
        from fewstep.sampling.spec import grid_rule_problem

        if self.gamma is not None and not (0.0 <= self.gamma <= 1.0):
            raise ValueError(f"invalid value for config key 'sampler.gamma': {self.gamma!r}; must lie in [0, 1]")
        problem = grid_rule_problem(self.grid) if self.grid else None
        if problem:
            raise ValueError(f"invalid value for config key 'sampler.grid': {self.grid!r}; {problem}")


@dataclass
class RunConfig:
    """A full run: seed, device (``auto`` = cuda when available, ``cpu``, ``cuda:N``) and one section per component.

    ``score_teacher`` (optional, same fields as ``teacher``): the teacher whose score is the marginal-alignment
    target of the methods that have one (reflow, reflow_distill: ``set_score_teacher``), when it must differ from
    the pair teacher: k-rectified flow takes pairs from the previous round
    (``teacher: {kind: run}``) but the score from the original teacher, since a rectified field's
    velocity-to-score conversion is not a score.
    """

    seed: int = 0
    device: str = "auto"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    score_teacher: TeacherConfig | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        for key, sec in (("teacher", self.teacher), ("score_teacher", self.score_teacher)):
            if sec is not None and sec.kind not in TEACHER_KINDS:
                raise ValueError(f"invalid value for config key '{key}.kind': {sec.kind!r}; "
                                 f"expected one of {TEACHER_KINDS}")
        if self.score_teacher is not None and self.score_teacher.guidance != 1.0:
            raise ValueError(f"config key 'score_teacher.guidance' must be 1.0, got {self.score_teacher.guidance!r}; "
                             "the MA score takes the method's guidance (teacher.guidance / method.cfg.guidance)")


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
            if node.get(p) is None:  # a missing or null (optional) section
                node[p] = {}
            nxt = node[p]
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
        sections = sorted(f.name for f in fields(RunConfig))
        for k in loaded:
            if k not in sections:
                raise ValueError(f"unknown config key {k!r} in {str(p)!r}; valid sections: {sections}")
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
