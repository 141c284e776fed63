r"""The ``fewstep`` command line.

Commands::

    fewstep methods                                   list registered methods
    fewstep train-teacher --data ring8 [overrides]    flow matching on a dataset (a teacher for kind=run)
    fewstep distill --method NAME [--config F.yaml] [--run-dir D] [--resume] [section.key=value ...]
    fewstep sample RUN_DIR [--nfe 4 | --grid 1,0.5,0] [--n 1000] [--out samples]   -> .npy + .png
    fewstep eval RUN_DIR [--nfe 1 2 4] [--n 2000]     metrics table + eval.json (analytic teachers)
    fewstep demo                                      ring8: reflow vs reflow+MA vs the teacher's Euler
    fewstep diagnose tv [args ...]                    diagnostics: fewstep.evaluation.diagnose.main_tv(["tv", args ...])

Multi-process: ``python -m torch.distributed.run --nproc_per_node 2 -m fewstep.cli distill ...``.
Run folders default to ``runs/<method>-<UTC timestamp>``; every run folder holds the resolved
``config.yaml``, ``metrics.csv``, TensorBoard files under ``tb/`` and ``ckpt-<step>/`` checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["main", "build_parser", "DIAGNOSTICS"]

#: Diagnostics reachable as ``fewstep diagnose NAME``; each maps to a function ``main_<name>(argv)`` of
#: :mod:`fewstep.evaluation.diagnose`, imported only when the command runs.
DIAGNOSTICS: dict[str, str] = {"tv": "main_tv"}


def _default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _latest_run_dir(method: str | None) -> Path:
    """The most recently modified ``runs/<method>-*`` folder (any method when None) that has a config.yaml."""
    pattern = f"{method}-*" if method else "*"
    runs = sorted((p for p in Path("runs").glob(pattern) if (p / "config.yaml").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"--resume: no run folder runs/{pattern} found; pass --run-dir")
    return runs[-1]


def _train(args: argparse.Namespace, method: str | None, base: dict) -> int:
    import torch

    import fewstep.training.distributed as D
    from fewstep.config.build import build_run
    from fewstep.config.schema import load_config, normalize_method_section, save_config

    torch.set_num_threads(args.threads)
    resume_dir = None
    if args.resume:
        resume_dir = Path(args.run_dir) if args.run_dir else _latest_run_dir(method)
        if not (resume_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume: {str(resume_dir)!r} is not a run folder (no config.yaml)")
    if resume_dir is not None and args.config is None:
        import yaml

        saved = normalize_method_section(yaml.safe_load((resume_dir / "config.yaml").read_text()))
        cfg = load_config(None, args.overrides, base=saved)
    else:
        if method is not None:
            base = {**base, "method": {"name": method}}
        cfg = load_config(args.config, args.overrides, base=base)
        if method is not None and cfg.method.name != method:
            cfg.method.name = method  # --method wins over the file
    rank, world, device = D.init_distributed(args.device or cfg.device)
    run_dir = resume_dir or (Path(args.run_dir) if args.run_dir else _default_run_dir(cfg.method.name))
    run_dir = Path(D.broadcast_string(str(run_dir)))  # one folder for all ranks
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()
    trainer = build_run(cfg, device=device, run_dir=run_dir, resume=args.resume)
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


def cmd_methods(args: argparse.Namespace) -> int:
    from fewstep.methods import list_methods

    items = list_methods()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        print(f"{name:{width}s}  {desc}")
    return 0


def _parse_grid(text: str | None, nfe: int) -> list[float] | int:
    if not text:
        return nfe
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--grid must be comma-separated times like 1,0.5,0; got {text!r}") from None


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fewstep.config.build import load_run_student
    from fewstep.sampling.samplers import sample_flowmap

    torch.set_num_threads(args.threads)
    student = load_run_student(args.run_dir, ema=not args.raw)
    event = tuple(student.net.event_shape)
    g = torch.Generator().manual_seed(args.seed)
    x1 = torch.randn(args.n, *event, generator=g)
    cond = None
    if args.label is not None:
        cond = torch.full((args.n,), args.label, dtype=torch.long)
    grid = _parse_grid(args.grid, args.nfe)
    with torch.no_grad():
        res = sample_flowmap(student, x1, grid=grid, cond=cond)
    out = Path(args.out or Path(args.run_dir) / f"samples-nfe{res.nfe}")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), res.x.numpy())
    print(f"wrote {out.with_suffix('.npy')} ({args.n} samples, {res.nfe} NFE)")
    png = _save_png(res.x, out.with_suffix(".png"), f"{Path(args.run_dir).name}: {res.nfe} NFE")
    if png is not None:
        print(f"wrote {png}")
    return 0


def _save_png(x: "torch.Tensor", path: Path, title: str) -> Path | None:
    """Scatter plot for 2-D samples, an image grid for 64-D (8x8) samples; None for other shapes."""
    import math

    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = x.reshape(x.shape[0], -1).detach().cpu().float()
    if flat.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(flat[:, 0], flat[:, 1], s=2)
        ax.set_aspect("equal")
    elif flat.shape[1] == 64:
        k = min(64, flat.shape[0])
        cols = int(math.ceil(math.sqrt(k)))
        rows = int(math.ceil(k / cols))
        grid = torch.full((rows * 9, cols * 9), -1.0)  # digit background is -1
        for i in range(k):
            r, c = divmod(i, cols)
            grid[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = flat[i].reshape(8, 8)
        fig, ax = plt.subplots(figsize=(cols * 0.6 + 1, rows * 0.6 + 1))
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.axis("off")
    else:
        return None
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from fewstep.config.build import load_run

    torch.set_num_threads(args.threads)
    try:
        from fewstep.evaluation.evaluate import evaluate_flowmap
    except ImportError as e:
        raise SystemExit(f"fewstep eval needs fewstep.evaluation.evaluate, which could not be imported: {e}") from None
    cfg, method, teacher = load_run(args.run_dir)
    ref = teacher if teacher is not None else None
    if ref is None:
        from fewstep.teachers.presets import PRESETS, load_preset

        if cfg.data.name not in PRESETS:
            raise SystemExit(f"fewstep eval needs an analytic reference; run {args.run_dir} has data "
                             f"{cfg.data.name!r} and no teacher")
        ref = load_preset(cfg.data.name, conditional=bool(cfg.data.kwargs.get("conditional", False)))
    emas = method.__dict__["ema_students"]
    student = next(iter(emas.values())) if emas and not args.raw else method.student
    res = evaluate_flowmap(student, getattr(ref, "inner", ref), nfe=tuple(args.nfe), n=args.n, seed=args.seed)
    metrics = sorted({m for d in res.values() for m in d})
    print("nfe  " + "  ".join(f"{m:>14s}" for m in metrics))
    for k, d in res.items():
        print(f"{k:<4} " + "  ".join(f"{float(d.get(m, float('nan'))):14.6g}" for m in metrics))
    out = Path(args.out or Path(args.run_dir) / "eval.json")
    out.write_text(json.dumps({str(k): v for k, v in res.items()}, indent=1, default=float))
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fewstep.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, threads=args.threads)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    if args.name not in DIAGNOSTICS:
        raise SystemExit(f"unknown diagnostic {args.name!r}; available: {', '.join(sorted(DIAGNOSTICS))}")
    try:
        import fewstep.evaluation.diagnose as diagnose
    except ImportError as e:
        raise SystemExit(f"`fewstep diagnose` needs the module fewstep.evaluation.diagnose, which is not available: {e}") from None
    fn = getattr(diagnose, DIAGNOSTICS[args.name], None)
    if fn is None:
        raise SystemExit(f"fewstep.evaluation.diagnose has no function {DIAGNOSTICS[args.name]}(argv)")
    rc = fn([args.name, *args.args])  # fewstep.evaluation.diagnose.main_<name> parses "<name> ..." (argv after `diagnose`)
    return int(rc or 0)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/README.md)")
    p.add_argument("--run-dir", help="run folder (default runs/<method>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's device)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 method.cfg.norm_p=0.75")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``fewstep`` command."""
    p = argparse.ArgumentParser(prog="fewstep", description="Distill flow-matching teachers into few-step students.")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list training methods").set_defaults(fn=cmd_methods)
    t = sub.add_parser("train-teacher", help="train a velocity teacher by flow matching on a dataset")
    t.add_argument("--data", default=None, help="dataset name (default: from the config, else ring8)")
    _add_train_args(t)
    t.set_defaults(fn=lambda a: _train(a, "flow_matching", {"data": {"name": a.data or "ring8"}}
                                       if a.config is None or a.data else {}))
    d = sub.add_parser("distill", help="train a few-step student with a method")
    d.add_argument("--method", help="method name (see `fewstep methods`); default: from the config")
    _add_train_args(d)
    d.set_defaults(fn=lambda a: _train(a, a.method, {}))
    s = sub.add_parser("sample", help="sample a trained student to .npy (and .png for 2-D data)")
    s.add_argument("run_dir")
    s.add_argument("--nfe", type=int, default=1, help="uniform grid with this many steps")
    s.add_argument("--grid", help="explicit decreasing times, e.g. 1,0.6,0")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="class label for conditional students")
    s.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--out", help="output path without suffix")
    s.set_defaults(fn=cmd_sample)
    e = sub.add_parser("eval", help="evaluate a run against its analytic teacher")
    e.add_argument("run_dir")
    e.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--raw", action="store_true")
    e.add_argument("--out")
    e.set_defaults(fn=cmd_eval)
    m = sub.add_parser("demo", help="ring8 demo: reflow vs reflow+MA vs teacher Euler (< 3 min on 2 cores)")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--steps", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=cmd_demo)
    g = sub.add_parser("diagnose", help=f"diagnostics ({', '.join(DIAGNOSTICS)}) from fewstep.evaluation.diagnose")
    g.add_argument("name", help=f"one of {sorted(DIAGNOSTICS)}")
    g.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the diagnostic")
    g.set_defaults(fn=cmd_diagnose)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (errors in user input exit with status 2 and one line)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
