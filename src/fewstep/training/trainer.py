r"""The training loop shared by every method: optimisers, LR schedules, EMA, accumulation, AMP, DDP, checkpoints.

Each iteration k runs the method contract (:mod:`fewstep.methods.base`): for every name in
``method.schedule(k)`` draw the GLOBAL batch (x0, cond from ``dataset.sample``; x1 ~ N(0, I); u ~ U[0,1)^8, all
from one generator seeded by (seed, k, name)), take this rank's slice, split it into ``grad_accum``
micro-batches, back-propagate ``loss / grad_accum``, all-reduce gradients (mean over ranks), clip, step that
network's optimiser at ``lr * factor(k)``, call ``method.after_update``, then update the student's EMA copies
(:class:`fewstep.training.optim.EMA`). Sampling uses the EMA weights by default (``trainer.student(ema=True)``).

Library use (five lines; ``Trainer(method, dataset, TrainConfig(...), run_dir).fit()`` for full control)::

    import torch, fewstep
    from fewstep import train
    trainer = train("flow_matching", teacher="ring8", steps=500, batch_size=256, lr=1e-3)
    student = trainer.student(ema=True)            # a FlowMap with EMA weights
    x = fewstep.sample_flowmap(student, torch.randn(1000, 2), grid=4).x
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fewstep.training.distributed as D
from fewstep.config.schema import TrainConfig
from fewstep.core.flowmap import FlowMap
from fewstep.methods.base import Batch, Method
from fewstep.training.batches import draw_global_batch, rank_micro_batches
from fewstep.training.callbacks import Callback, CSVLogger
from fewstep.training.checkpoint import (
    CheckpointError,
    check_run_dir,
    list_checkpoints,
    load_latest,
    restore_trainer_state,
    save_checkpoint,
    trainer_state,
)
from fewstep.training.fsdp import shard_student
from fewstep.training.optim import EMA, clip_grad_norm, derive_seed, lr_factor, make_optimizer

__all__ = ["Trainer", "TrainConfig", "Callback", "EMA", "lr_factor", "derive_seed", "check_run_dir"]


class Trainer:
    """Train a :class:`~fewstep.methods.base.Method` on a dataset.

    Args:
        method: The method (owns student, teacher, auxiliary nets), already on its device.
        dataset: Object with ``sample(n, generator) -> (x0, cond|None)`` and ``event_shape``; may be None for
            data-free methods (then x0 and cond are None).
        config: Optimisation settings.
        run_dir: Folder for metrics.csv, TensorBoard, checkpoints (None: nothing is written).
        callbacks: :class:`~fewstep.training.callbacks.Callback` objects.
        seed: Seeds batches, the global RNG (per step and rank) and ``method.prepare``.
        resume: Continue from the newest valid checkpoint in ``run_dir`` if one exists.
        run_config: Optional full config saved in checkpoints (for ``fewstep sample``).
    """

    def __init__(self, method: Method, dataset: Any, config: TrainConfig, run_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), seed: int = 0, *, resume: bool = False,
                 run_config: dict[str, Any] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if method.uses_data(method.config) and dataset is None:
            raise ValueError(f"method {method.name!r} needs data: pass a dataset")
        self.method, self.dataset, self.config, self.seed = method, dataset, config, int(seed)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.resume, self.run_config = resume, run_config
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.fsdp = config.fsdp and self.world > 1
        if config.fsdp and not self.fsdp:
            warnings.warn("train.fsdp=true in a single process: training unsharded", UserWarning, stacklevel=2)
        self.device = next(method.student.parameters()).device
        self.amp = config.amp if self.device.type == "cuda" else "off"
        if self.amp != config.amp:
            warnings.warn(f"train.amp={config.amp!r} needs CUDA; training in float32 on {self.device}", UserWarning,
                          stacklevel=2)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.base_lrs: dict[str, float] = {}
        self.ema: EMA | None = None
        self.step = 0
        self.logger: CSVLogger | None = None
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, Any]] = []
        self._prepared = False
        shard = self.world * config.grad_accum
        if config.batch_size % shard:
            raise ValueError(f"train.batch_size={config.batch_size} must be divisible by world_size*grad_accum"
                             f"={shard}")
        self.event_shape = tuple(getattr(dataset, "event_shape", None) or method.student.net.event_shape)

    def student(self, ema: bool = True, decay: float | None = None) -> FlowMap:
        """The student flow map; with ``ema=True`` the EMA copy (``decay`` or the first of ema_decays)."""
        if not ema or self.ema is None:
            return self.method.student
        d = self.ema.decays[0] if decay is None else float(decay)
        if d not in self.ema.copies:
            raise ValueError(f"no EMA with decay {d}; available {self.ema.decays}")
        return self.ema.copies[d]

    # ------------------------------------------------------------------ batches (fewstep.training.batches)
    def global_batch(self, step: int, name: str, occurrence: int = 0) -> Batch:
        """The global batch of (step, name): x0, cond, then x1 and u from one seeded CPU generator."""
        return draw_global_batch(self.method, self.dataset, self.event_shape, self.config.batch_size,
                                 derive_seed(self.seed, step, name, occurrence))

    def shards(self, batch: Batch) -> list[Batch]:
        """This rank's micro-batches: the global batch cut into world*grad_accum equal chunks."""
        return rank_micro_batches(batch, self.rank, self.world, self.config.grad_accum, self.device)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """Run every update of iteration ``step``; returns the logged floats."""
        torch.manual_seed(derive_seed(self.seed, step, "rank", self.rank))
        logs: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name in self.method.schedule(step):
            if name not in self.nets:
                raise ValueError(f"schedule() returned {name!r}, not in trainable(): {sorted(self.nets)}")
            k = counts[name] = counts.get(name, -1) + 1
            for m in self.nets.values():
                m.zero_grad(set_to_none=True)
            net, opt = self.nets[name], self.optimizers[name]
            acc: dict[str, float] = {}
            for mb in self.shards(self.global_batch(step, name, k)):
                ctx = (torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
                       if self.amp != "off" else nullcontext())
                with ctx:
                    loss, extra = self.method.loss(name, mb, step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss for {name!r} at step {step}: {float(loss)}")
                scaled = loss / self.config.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                for key, v in extra.items():
                    acc[key] = acc.get(key, 0.0) + float(v) / self.config.grad_accum
            D.allreduce_gradients(net)
            if self.scaler:
                self.scaler.unscale_(opt)
            gn = clip_grad_norm(net, self.config.grad_clip)
            if self.scaler is None and not math.isfinite(gn):  # fp16: the scaler skips such steps itself
                raise FloatingPointError(f"non-finite gradient norm for {name!r} at step {step}: {gn} (diverged; "
                                         "lower train.lr or set train.grad_clip > 0)")
            lr = self.base_lrs[name] * lr_factor(step, self.config)
            for group in opt.param_groups:
                group["lr"] = lr
            if self.scaler:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            if name == "student" and self.ema is not None:
                self.ema.update(self.method.student)
            self.method.after_update(name, step)
            for key, v in acc.items():
                logs[f"{name}/{key}"] = v
            logs[f"{name}/grad_norm"], logs[f"{name}/lr"] = gn, lr
        return logs

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Method:
        """Train for ``config.steps`` steps (continuing from a checkpoint when ``resume``); returns the method."""
        cfg = self.config
        if self.run_dir is not None and self.rank == 0:
            check_run_dir(self.run_dir, self.resume)
        self.prepare()
        if self.resume and self.try_resume() and self.rank == 0:
            print(f"resumed from {self.run_dir}/ckpt-{self.step}", file=sys.stderr)
        if self.run_dir is not None and self.rank == 0:
            self.logger = CSVLogger(self.run_dir, tensorboard=cfg.tensorboard, start_step=self.step)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        bar = None
        if cfg.progress and self.rank == 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        t0, n0 = time.perf_counter(), self.step
        while self.step < cfg.steps:
            step = self.step
            logs = self.train_step(step)
            self.step = step + 1
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            for cb in self.callbacks:
                cb.on_step_end(self, step, logs)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                row = D.all_reduce_log_means(window)
                row["it_per_s"] = (self.step - n0) / max(time.perf_counter() - t0, 1e-9)
                self.history.append({"step": self.step, **row})
                if self.logger is not None:
                    self.logger.log(self.step, row)
                if bar is not None:
                    loss = next((v for k, v in row.items() if k.endswith("/loss")), float("nan"))
                    bar.set_postfix(loss=f"{loss:.4g}")
                window = {}
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.steps:
                self.evaluate()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step != cfg.steps:
                self.save()
        if bar is not None:
            bar.close()
        self.save()  # the weights are safe before the final evaluation can fail
        self.evaluate()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        if self.logger is not None:
            self.logger.close()
        return self.method

    def evaluate(self) -> None:
        """Call every callback's ``on_eval`` (rank 0 only)."""
        if self.rank != 0:
            return
        for cb in self.callbacks:
            cb.on_eval(self, self.step)

    def prepare(self) -> None:
        """Broadcast weights from rank 0, run ``method.prepare`` once (fixed seed), then build optimisers and EMA."""
        if self._prepared:
            return
        D.broadcast_module(self.method)
        state = torch.random.get_rng_state()
        torch.manual_seed(derive_seed(self.seed, "prepare"))
        self.method.prepare({"dataset": self.dataset, "device": self.device, "seed": self.seed,
                             "run_dir": self.run_dir, "rank": self.rank, "world_size": self.world,
                             "batch_size": self.config.batch_size, "steps": self.config.steps})
        torch.random.set_rng_state(state)
        D.broadcast_module(self.method)
        cfg = self.config
        self.nets = self.method.trainable()
        if "student" not in self.nets:
            raise ValueError(f"method {self.method.name!r}: trainable() must include 'student'")
        self.ema = EMA(self.method.student, cfg.ema_decays, cfg.ema_warmup) if cfg.ema_decays else None
        if self.fsdp:  # after the EMA deep copies (full modules), before the optimisers (sharded parameters)
            shard_student(self.method.student, self.world, self.device)
        unknown = set(cfg.lr_overrides) - set(self.nets)
        if unknown:
            raise ValueError(f"train.lr_overrides names unknown networks {sorted(unknown)}; "
                             f"trainable: {sorted(self.nets)}")
        self.optimizers = {n: make_optimizer(m, cfg, name=n) for n, m in self.nets.items()}
        self.base_lrs = {n: float(cfg.lr_overrides.get(n, cfg.lr)) for n in self.nets}
        self._prepared = True

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """All trainer state as (named tensors, JSON-able dict).

        See :func:`fewstep.training.checkpoint.trainer_state`.
        """
        return trainer_state(self)

    def save(self) -> Path | None:
        """Write ``ckpt-<step>`` (rank 0 only; with FSDP every rank joins the gathering); all ranks wait for it."""
        out = None
        if self.run_dir is not None and (self.rank == 0 or self.fsdp):
            tensors, state = self.state_tensors()
        if self.run_dir is not None and self.rank == 0:
            out = save_checkpoint(self.run_dir, self.step, tensors, state, keep=self.config.keep_checkpoints)
        D.barrier()
        return out

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore everything written by :meth:`state_tensors`."""
        restore_trainer_state(self, tensors, state)

    def try_resume(self) -> bool:
        """Load the newest valid checkpoint of ``run_dir``; returns whether one was found."""
        if self.run_dir is None:
            return False
        found = load_latest(self.run_dir, device=self.device)
        if found is None:
            if list_checkpoints(self.run_dir):
                raise CheckpointError(f"--resume: every checkpoint in {str(self.run_dir)!r} is incomplete or corrupt; "
                                      "not restarting from step 0 over its metrics (delete the folder or use "
                                      "another --run-dir)")
            return False
        _, tensors, state = found
        self.load_state(tensors, state)
        return True

