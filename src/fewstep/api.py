"""The one-call library API: :func:`train` builds teacher, dataset, student and method by name and trains them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fewstep.config.build import build_from_objects
from fewstep.config.schema import TrainConfig
from fewstep.config.typed import from_dict
from fewstep.methods.base import Method
from fewstep.training.callbacks import Callback
from fewstep.training.trainer import Trainer

__all__ = ["train"]


def train(method: str | Method, teacher: Any = "ring8", dataset: Any = None, steps: int = 1000, *,
          run_dir: str | Path | None = None, seed: int = 0, method_cfg: dict[str, Any] | None = None,
          student: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (), **train_kw: Any) -> Trainer:
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
        **train_kw: Any :class:`TrainConfig` field (batch_size, lr, ema_decays, ...).
    """
    cfg = from_dict(TrainConfig, {"steps": steps, **train_kw}, prefix="train")
    m, data = build_from_objects(method, teacher, dataset, method_cfg or {}, student or {}, seed)
    trainer = Trainer(m, data, cfg, run_dir=run_dir, callbacks=callbacks, seed=seed)
    trainer.fit()
    return trainer
