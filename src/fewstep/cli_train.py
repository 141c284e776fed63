"""``fewstep train-teacher`` / ``fewstep distill``: train a config into a run folder (see :mod:`fewstep.cli`).

Run folders default to ``runs/<method>-<UTC timestamp>``; ``--resume`` without ``--run-dir`` continues the newest
``runs/<method>-*`` folder. The heavy imports (torch, the config builders) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["CONDITIONAL_BY_DEFAULT", "add_train_args", "default_run_dir", "latest_run_dir", "run_train"]


#: Datasets whose default is class-conditional (``data.kwargs.conditional=false`` makes them unconditional).
CONDITIONAL_BY_DEFAULT = ("moons", "spirals", "digits_data")


def default_run_dir(method: str) -> Path:
    """``runs/<method>-<UTC timestamp>``."""
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def latest_run_dir(method: str | None) -> Path:
    """The most recently modified ``runs/<method>-*`` folder (any method when None) that has a config.yaml."""
    pattern = f"{method}-*" if method else "*"
    runs = sorted((p for p in Path("runs").glob(pattern) if (p / "config.yaml").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"--resume: no run folder runs/{pattern} found; pass --run-dir")
    return runs[-1]


def run_train(args: argparse.Namespace, method: str | None, base: dict) -> int:
    """Train ``method`` (None: the config's) from ``--config`` over ``base``, with overrides, into the run folder.

    Args:
        args: The parsed ``train-teacher`` / ``distill`` arguments.
        method: The method name, which wins over the config's; None keeps the config's.
        base: Config keys under the file and the overrides (e.g. ``train-teacher``'s data).

    Returns:
        Exit status 0.

    Raises:
        ValueError: for ``--resume`` together with ``--overwrite``.
    """
    import torch

    import fewstep.training.distributed as D
    from fewstep.config.build import build_run, resolve_sampler
    from fewstep.config.run_folder import read_run_config
    from fewstep.config.schema import SamplerConfig, load_config, save_config, to_dict
    from fewstep.training.checkpoint import check_run_dir, clear_run

    torch.set_num_threads(args.threads)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    resume_dir = None
    if args.resume:
        resume_dir = Path(args.run_dir) if args.run_dir else latest_run_dir(method)
    if resume_dir is not None and args.config is None:
        cfg = load_config(None, args.overrides, base=to_dict(read_run_config(resume_dir)))
    else:
        if resume_dir is not None:
            read_run_config(resume_dir)  # a run folder at all?
        if method is not None:
            base = {**base, "method": {"name": method}}
        cfg = load_config(args.config, args.overrides, base=base)
        if method is not None and cfg.method.name != method:
            cfg.method.name = method  # --method wins over the file
    spec = resolve_sampler(cfg)
    cfg.sampler = SamplerConfig(gamma=spec.gamma, grid=spec.grid)  # stored resolved in the run folder
    rank, world, device = D.init_distributed(args.device or cfg.device)
    run_dir = resume_dir or (Path(args.run_dir) if args.run_dir else default_run_dir(cfg.method.name))
    run_dir = Path(D.broadcast_string(str(run_dir)))  # one folder for all ranks
    trainer = build_run(cfg, device=device, run_dir=run_dir, resume=args.resume)  # validates every key first
    if rank == 0:
        if args.overwrite and run_dir.is_dir():
            clear_run(run_dir)
        check_run_dir(run_dir, args.resume)
        save_config(cfg, run_dir / "config.yaml")
        ds = trainer.dataset
        if cfg.data.name in CONDITIONAL_BY_DEFAULT and getattr(ds, "num_classes", None):
            print(f"note: data {cfg.data.name!r} is class-conditional ({ds.num_classes} classes) by default; "
                  "data.kwargs.conditional=false trains an unconditional student", file=sys.stderr)
        print(f"multi-step sampler: {spec.describe()} (method {cfg.method.name}; override with sampler.gamma=...)",
              file=sys.stderr)
    D.barrier()
    trainer.fit()
    if rank == 0:
        last = trainer.history[-1] if trainer.history else {}
        print(f"done: {trainer.step} steps; run folder {run_dir}")
        for k, v in last.items():
            print(f"  {k:28s} {v:.6g}")
        for rec in trainer.eval_history[-1:]:
            for nfe, d in rec["results"].items():
                print(f"  eval nfe={nfe}: " + ", ".join(f"{m}={v:.4g}" for m, v in d.items()
                                                     if isinstance(v, (int, float))))
    D.cleanup()
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The arguments shared by ``train-teacher`` and ``distill`` (config, run folder, resume, device, overrides)."""
    p.add_argument("--config", help="YAML run config (see configs/README.md)")
    p.add_argument("--run-dir", help="run folder (default runs/<method>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints of a run already in --run-dir")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's device)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 method.cfg.norm_p=0.75")
