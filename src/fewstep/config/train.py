"""The ``train`` section of a run config: optimisation settings of :class:`fewstep.training.trainer.Trainer`.

Re-exported by :mod:`fewstep.config.schema` with the other sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrainConfig", "OPTIMIZERS", "LR_SCHEDULES", "AMP_MODES"]

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
AMP_MODES = ("off", "bf16", "fp16")


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
