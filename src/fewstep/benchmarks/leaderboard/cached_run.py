"""Train a run config into a cached run folder, atomically: the bench's learned teachers and its cell inits.

A cached run folder either exists complete or not at all: the run is trained as ``fewstep train-teacher`` /
``fewstep distill`` train one (:func:`fewstep.config.build.build_run`, the config saved as ``config.yaml`` with its
sampler resolved, so ``load_run`` and ``student.init_from`` read it) into a temporary sibling folder, which is renamed
into place only when training has finished. A cut-off training leaves no folder under the cached name.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep.config.build import build_run, resolve_sampler
from fewstep.config.schema import RunConfig, SamplerConfig, save_config

__all__ = ["train_run_folder"]


def train_run_folder(
    cfg: RunConfig,
    out: Path,
    threads: int | None = None,
    on_trainer: Callable[[Any], Callable[[], None] | None] | None = None,
) -> float:
    """Train ``cfg`` on the CPU into the run folder ``out``, which appears (by a rename) only once complete.

    Args:
        cfg: The run config (not modified; the saved copy has its sampler resolved).
        out: The run folder to create; it must not exist yet.
        threads: Torch threads while training (restored afterwards); None keeps the current setting.
        on_trainer: Called with the built trainer before training (e.g. to install evaluation counters); the
            callable it returns, if any, is called after training, also when training fails.

    Returns:
        Seconds spent training (``prepare`` + ``fit``).
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    spec = resolve_sampler(cfg)
    cfg = dataclasses.replace(cfg, sampler=SamplerConfig(gamma=spec.gamma, grid=spec.grid))
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        trainer = build_run(cfg, device="cpu", run_dir=tmp, with_eval=False)
        tmp.mkdir(parents=True)
        save_config(cfg, tmp / "config.yaml")
        done = on_trainer(trainer) if on_trainer is not None else None
        t0 = time.perf_counter()
        try:
            trainer.prepare()
            trainer.fit()
        finally:
            if done is not None:
                done()
        train_s = time.perf_counter() - t0
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(saved)
    if out.is_dir():  # another process finished the same run first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return train_s
