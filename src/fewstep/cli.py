r"""The ``fewstep`` command line.

Commands::

    fewstep methods                                   list registered methods
    fewstep train-teacher --data ring8 [overrides]    flow matching on a dataset (a teacher for kind=run)
    fewstep distill --method NAME [--config F.yaml] [--run-dir D] [--resume | --overwrite] [section.key=value ...]
    fewstep sample RUN_DIR [--nfe 4 | --grid 1,0.5,0] [--gamma G] [--n 1000] [--label L] [--out samples]
    fewstep sample RUN_DIR --class-grid 1 2 4 [--out grid]    image students: one row per class, a column per NFE
    fewstep eval RUN_DIR [--nfe 1 2 4] [--n 2000] [--gamma G] [--grid uniform|edm|power:P]   metrics with the teacher's
    fewstep eval RUN_DIR --target guided_ode|tilted|mixture [--w W]   class-conditional 2-D teachers: vs one CFG target
    fewstep export RUN_DIR --format diffusers OUT [--nfe K]   a diffusers folder (student of a diffusers teacher)
    fewstep demo                                      ring8: reflow vs reflow+MA vs the teacher's Euler
    fewstep diagnose tv [args ...]                    diagnostics: fewstep.evaluation.diagnose.main_tv(["tv", args ...])
    fewstep bench [--quick] [--methods ...] [--targets ring8 aniso3 digits random]   leaderboard (fewstep.cli_bench)

Multi-process: ``python -m torch.distributed.run --nproc_per_node 2 -m fewstep.cli distill ...``.
Run folders default to ``runs/<method>-<UTC timestamp>``; every run folder holds the resolved
``config.yaml`` (including the ``sampler`` section: the method's own multi-step sampler, e.g. gamma = 1 for
consistency students), ``metrics.csv``, TensorBoard files under ``tb/`` and ``ckpt-<step>/`` checkpoints.
Every user error ends as one line ``fewstep: error: ...`` with exit status 2 (1 for a diverged run).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from fewstep.cli_train import CONDITIONAL_BY_DEFAULT, add_train_args, run_train

__all__ = ["main", "build_parser", "DIAGNOSTICS", "CONDITIONAL_BY_DEFAULT"]

#: Diagnostics reachable as ``fewstep diagnose NAME``; each maps to a function ``main_<name>(argv)`` of
#: :mod:`fewstep.evaluation.diagnose`, imported only when the command runs.
DIAGNOSTICS: dict[str, str] = {"tv": "main_tv"}

def cmd_methods(args: argparse.Namespace) -> int:
    from fewstep.methods import list_methods

    items = list_methods()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        print(f"{name:{width}s}  {desc}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from fewstep.cli_sample import run_sample

    return run_sample(args)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from fewstep.cli_eval import run_eval

    torch.set_num_threads(args.threads)
    return run_eval(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from fewstep.demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, threads=args.threads)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    if args.name not in DIAGNOSTICS:
        raise ValueError(f"unknown diagnostic {args.name!r}; available: {', '.join(sorted(DIAGNOSTICS))}")
    import fewstep.evaluation.diagnose as diagnose

    rc = getattr(diagnose, DIAGNOSTICS[args.name])([args.name, *args.args])
    return int(rc or 0)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gamma", type=float, default=None,
                   help="CTM gamma in [0, 1] (0 deterministic jumps, 1 fresh noise); default: the run's sampler")
    p.add_argument("--grid", help="grid rule (uniform, edm, power:P = (1 - i/K)^P) or explicit decreasing times "
                                  "ending at 0, e.g. 1,0.6,0; default: the run's sampler")


def cmd_export(args: argparse.Namespace) -> int:
    """``fewstep export RUN --format diffusers OUT`` (fewstep.integrations.diffusers.export.export_run)."""
    import torch

    from fewstep.integrations.diffusers.export import export_run

    torch.set_num_threads(args.threads)
    export_run(args.run_dir, args.out, nfe=args.nfe, ema=not args.raw, components=args.components)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``fewstep`` command."""
    p = argparse.ArgumentParser(prog="fewstep", description="Distill flow-matching teachers into few-step students.")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list training methods").set_defaults(fn=cmd_methods)
    t = sub.add_parser("train-teacher", help="train a velocity teacher by flow matching on a dataset")
    t.add_argument("--data", default=None, help="dataset name (default: from the config, else ring8); moons, spirals "
                                                "are class-conditional by default (data.kwargs.conditional=false)")
    add_train_args(t)
    t.set_defaults(fn=lambda a: run_train(a, "flow_matching", {"data": {"name": a.data or "ring8"}}
                                       if a.config is None or a.data else {}))
    d = sub.add_parser("distill", help="train a few-step student with a method")
    d.add_argument("--method", help="method name (see `fewstep methods`); default: from the config")
    add_train_args(d)
    d.set_defaults(fn=lambda a: run_train(a, a.method, {}))
    s = sub.add_parser("sample", help="sample a trained student to .npy + .json (and .png)")
    s.add_argument("run_dir")
    s.add_argument("--nfe", type=int, default=1, help="number of steps on the run's grid rule")
    _add_sampler_args(s)
    s.add_argument("--allow-partial", action="store_true", help="allow an explicit --grid that stops before t=0")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="class label 0..K-1 for conditional students (moons, "
                                                           "spirals are conditional by default)")
    s.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--decode", action="store_true", help="also decode latents through the teacher's VAE (diffusers)")
    s.add_argument("--out", help="output path without suffix")
    s.add_argument("--class-grid", type=int, nargs="+", metavar="NFE",
                   help="instead: OUT.png with one row per class (2 samples each) and one column per NFE")
    s.set_defaults(fn=cmd_sample)
    e = sub.add_parser("eval", help="metrics of a run beside the teacher's own (Euler, adaptive, exact floor)")
    e.add_argument("run_dir")
    e.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    _add_sampler_args(e)
    e.add_argument("--n", type=int, default=None,
                   help="samples per metric (default 2000; image runs: the set's floor size, 898 for digits8)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--raw", action="store_true")
    e.add_argument("--target", choices=("guided_ode", "tilted", "mixture"),
                   help="class-conditional 2-D analytic teachers: score against the guided-ODE endpoint, the tilted "
                        "density p(x|c)^w p(x)^(1-w) or the w=1 mixture (fewstep.benchmarks.dm_targets)")
    e.add_argument("--w", type=float, help="guidance weight of --target (default: the run's)")
    e.add_argument("--out")
    e.set_defaults(fn=cmd_eval)
    x = sub.add_parser("export", help="write a run's student in another library's format (diffusers)")
    x.add_argument("run_dir")
    x.add_argument("--format", required=True, choices=["diffusers"])
    x.add_argument("out", help="output folder (new or empty)")
    x.add_argument("--nfe", type=int, default=1, help="default number of steps recorded with the export")
    x.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    x.add_argument("--components", choices=["copy", "link", "none"], default="copy",
                   help="the teacher pipeline's other components (vae, text encoders): copy, symlink or omit")
    x.set_defaults(fn=cmd_export)
    m = sub.add_parser("demo", help="ring8 demo: reflow vs reflow+MA vs teacher Euler (< 3 min on 2 cores)")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--steps", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=cmd_demo)
    g = sub.add_parser("diagnose", help=f"diagnostics ({', '.join(DIAGNOSTICS)}) from fewstep.evaluation.diagnose")
    g.add_argument("name", help=f"one of {sorted(DIAGNOSTICS)}")
    g.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the diagnostic")
    g.set_defaults(fn=cmd_diagnose)
    from fewstep.cli_bench import add_bench_parser  # fewstep bench: the equal-budget leaderboard

    add_bench_parser(sub)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"fewstep: warning: {message}\n"


def _line(e: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(e).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and return 2; a diverged or corrupt run 1."""
    from fewstep.training.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.fn(args) or 0)
    except FloatingPointError as e:
        print(f"fewstep: error: training diverged: {_line(e)}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"fewstep: error: {_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:  # OSError: FileNotFound, FileExists, Permission, IsADirectory
        print(f"fewstep: error: {_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line, the traceback only on request
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"fewstep: internal error: {type(e).__name__}: {_line(e)} (FEWSTEP_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = old_format


if __name__ == "__main__":
    sys.exit(main())
