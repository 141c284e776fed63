"""The one-call library API: :func:`train` builds teacher, dataset, student and method by name and trains them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewstep.config.build import build_from_objects
from fewstep.config.schema import TrainConfig
from fewstep.config.typed import from_dict
from fewstep.methods.base import Method
from fewstep.training.callbacks import Callback
from fewstep.training.trainer import Trainer

__all__ = ["train"]


def train(method: str | Method, teacher: Any = "ring8", dataset: Any = None, steps: int = 1000, *,
          run_dir: str | Path | None = None, seed: int = 0, method_cfg: dict[str, Any] | None = None,
          student: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (), threads: int | None = 1,
          **train_kw: Any) -> Trainer:
    """One call: build teacher, dataset, student and method, train, return the :class:`Trainer`.

    Example:
        >>> from fewstep import train
        >>> tr = train("meanflow", teacher="ring8", steps=2000, batch_size=512, method_cfg={"norm_p": 0.75})
        >>> student = tr.student(ema=True)  # FlowMap; sample with fewstep.sample_flowmap(student, x1, grid=2)

    Args:
        method: A registered method name or a built Method.
        teacher: Preset name, a teacher module, or None for data-only methods.
        dataset: A dataset object, a dataset name, or None (the teacher's exact samples).
        steps: Training steps.
        run_dir: Optional run folder.
        seed: Random seed.
        method_cfg: Method hyper-parameters (checked by ``Method.make_config``).
        student: StudentConfig fields (hidden, depth, emb_dim, parameterization).
        callbacks: Extra callbacks.
        threads: torch CPU threads while training (default 1, as the CLI's ``--threads``: on a small MLP more
            threads on busy cores are slower, 160 s vs 19 s for the README quick start); the previous setting is
            restored afterwards. None leaves torch's setting alone.
        **train_kw: Any :class:`TrainConfig` field (batch_size, lr, ema_decays, ...).

    Returns:
        The trainer after :meth:`Trainer.fit`; its ``student(ema=True)`` is the trained flow map.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None; got {threads!r}")
    cfg = from_dict(TrainConfig, {"steps": steps, **train_kw}, prefix="train")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        m, data = build_from_objects(method, teacher, dataset, method_cfg or {}, student or {}, seed)
        trainer = Trainer(m, data, cfg, run_dir=run_dir, callbacks=callbacks, seed=seed)
        if run_dir is not None:
            _write_run_config(Path(run_dir), method, teacher, dataset, method_cfg or {}, student or {}, cfg, seed)
        trainer.fit()
    finally:
        torch.set_num_threads(old)
    return trainer


def _write_run_config(run_dir: Path, method: Any, teacher: Any, dataset: Any, method_cfg: dict[str, Any],
                      student: dict[str, Any], cfg: TrainConfig, seed: int) -> None:
    """Write the resolved ``config.yaml`` so ``fewstep sample/eval`` can use a library run folder.

    Only runs named entirely by strings (method, preset teacher, dataset name) can be rebuilt from a config;
    for others a warning says the folder holds checkpoints without a config.
    """
    import warnings

    from fewstep.config.build import resolve_sampler
    from fewstep.config.schema import (
        DataConfig,
        MethodSection,
        RunConfig,
        SamplerConfig,
        StudentConfig,
        TeacherConfig,
        save_config,
    )

    if not isinstance(method, str) or not (teacher is None or isinstance(teacher, str)) or \
            not (dataset is None or isinstance(dataset, str)):
        warnings.warn(f"run folder {str(run_dir)!r}: method, teacher and dataset given as objects cannot be "
                      "rebuilt from a config, so no config.yaml is written and `fewstep sample/eval` cannot load "
                      "it; pass names (e.g. teacher='ring8') for a CLI-usable folder", UserWarning, stacklevel=3)
        return
    rc = RunConfig(seed=seed, device="cpu", teacher=TeacherConfig(kind="preset", name=teacher or "ring8"),
                   data=DataConfig(name=dataset or "teacher"), student=from_dict(StudentConfig, student, "student"),
                   method=MethodSection(name=method, cfg=dict(method_cfg)), train=cfg)
    spec = resolve_sampler(rc)
    rc.sampler = SamplerConfig(gamma=spec.gamma, grid=spec.grid)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(rc, run_dir / "config.yaml")
