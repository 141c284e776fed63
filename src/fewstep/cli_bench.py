"""``fewstep bench``: the equal-budget leaderboard (:mod:`fewstep.benchmarks.leaderboard`) from the command line.

Examples::

    fewstep bench --quick                                  # minutes: small budget, 2 targets, 1 seed
    fewstep bench                                          # the full grid into docs/leaderboard.md (+ .json, .png)
    fewstep bench --targets random --seeds 0 --shard 0/2   # one of two processes sharing the cache
    fewstep bench --report-only                            # regenerate the page from the stored cells
    fewstep bench --targets learned-digits --seeds 0       # a learned teacher on real digits (trained, cached)

Finished cells are stored as small metrics JSON files under ``--cells-dir`` (``docs/leaderboard_cells`` for the full
leaderboard, tracked by git, so results survive a machine change; :mod:`fewstep.benchmarks.leaderboard.store`).
A method that declares an init (``Method.needs_init``: dmd, dmd2, ddmd, cdm) starts from a flow-matching run of the
same target, seed and budget, trained once and cached in ``$FEWSTEP_BENCH_INIT`` (default ``runs/bench-init``;
:mod:`fewstep.benchmarks.leaderboard.init`).
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

__all__ = ["add_bench_parser", "cmd_bench", "FULL", "QUICK"]

#: Defaults of the full leaderboard and of ``--quick`` (explicit options override either).
FULL: dict[str, Any] = {
    "targets": ["ring8", "aniso3", "digits", "random", "learned-digits"],
    "seeds": [0, 1, 2],
    "steps": 2000,
    "batch_size": 512,
    "hidden": 256,
    "depth": 4,
    "n": 2000,
    "probes": 4,
    "cells_dir": "docs/leaderboard_cells",
    "out": "docs/leaderboard.md",
}
QUICK: dict[str, Any] = {
    "targets": ["ring8", "random:0"],
    "seeds": [0],
    "steps": 200,
    "batch_size": 256,
    "hidden": 128,
    "depth": 3,
    "n": 500,
    "probes": 2,
    "cells_dir": "runs/bench-quick",
    "out": "runs/bench-quick/leaderboard.md",
}


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N, e.g. 0/2; got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N; got {text!r}")
    return i, n


def add_bench_parser(sub: Any) -> None:
    """Register ``bench`` on the subparsers of the ``fewstep`` command."""
    b = sub.add_parser("bench", help="equal-budget leaderboard: methods x targets x NFE 1,2,4 x seeds (resumable)")
    b.add_argument("--quick", action="store_true", help="small budget, ring8 + one random mixture, one seed")
    b.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    b.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="ring8, aniso3, digits, random (= random:0..N-1), random:<seed>, mixture .json files; learned teachers "
        "on real data: learned-digits (trained once by configs/teacher_digits_bench.yaml, cached in "
        "$FEWSTEP_BENCH_TEACHERS, default runs/bench-teachers), learned:<train-teacher config.yaml>",
    )
    b.add_argument("--random-n", type=int, default=10, help="mixtures in the 'random' suite (default 10)")
    b.add_argument("--seeds", nargs="+", type=int, default=None)
    for name in ("steps", "batch-size", "hidden", "depth", "n", "probes"):
        b.add_argument(f"--{name}", type=int, default=None)
    b.add_argument(
        "--cells-dir",
        "--run-dir",
        dest="cells_dir",
        default=None,
        help="cell store (default docs/leaderboard_cells, tracked; --quick runs/bench-quick)",
    )
    b.add_argument(
        "--import-json",
        default=None,
        help="first import the one-seed rows of an earlier leaderboard JSON as cells (eval version 1)",
    )
    b.add_argument("--out", default=None, help="markdown path; .json and .png beside it (default docs/leaderboard.md)")
    b.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: run every N-th cell from the I-th")
    b.add_argument("--retry-failed", action="store_true", help="rerun cells cached as failed")
    b.add_argument("--report-only", action="store_true", help="only regenerate the page from the stored cells")
    b.add_argument("--no-figure", action="store_true")
    b.set_defaults(fn=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the missing cells, then write the leaderboard page, JSON and figure."""
    import torch

    from fewstep.benchmarks.leaderboard import Budget, run_grid, write_leaderboard
    from fewstep.benchmarks.leaderboard.runner import grid_cells
    from fewstep.benchmarks.leaderboard.store import import_leaderboard_json
    from fewstep.benchmarks.leaderboard.targets import expand_targets
    from fewstep.methods.registry import get_method, list_methods

    torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    opt = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    methods = args.methods or sorted(list_methods())
    for m in methods:
        get_method(m)
    if args.random_n < 1:
        raise ValueError(f"--random-n must be >= 1; got {args.random_n}")
    targets = expand_targets(opt["targets"], args.random_n)
    budget = Budget(
        steps=opt["steps"],
        batch_size=opt["batch_size"],
        hidden=opt["hidden"],
        depth=opt["depth"],
        n=opt["n"],
        probes=opt["probes"],
    )
    cmd = shlex.join(
        [
            "fewstep",
            "bench",
            "--methods",
            *methods,
            "--targets",
            *opt["targets"],
            "--random-n",
            str(args.random_n),
            "--seeds",
            *map(str, opt["seeds"]),
            "--steps",
            str(budget.steps),
            "--batch-size",
            str(budget.batch_size),
            "--hidden",
            str(budget.hidden),
            "--depth",
            str(budget.depth),
            "--n",
            str(budget.n),
            "--probes",
            str(budget.probes),
            "--cells-dir",
            opt["cells_dir"],
            "--out",
            opt["out"],
        ]
    )
    if args.import_json:
        n = import_leaderboard_json(args.import_json, opt["cells_dir"], _provenance(args.import_json))
        print(f"import {args.import_json}: " + ", ".join(f"{v} {k}" for k, v in n.items()))
    if not args.report_only:
        counts = run_grid(
            methods,
            targets,
            list(opt["seeds"]),
            budget,
            opt["cells_dir"],
            cmd,
            shard=args.shard,
            retry_failed=args.retry_failed,
        )
        print(f"cells: {counts['ran']} run, {counts['cached']} cached, {counts['failed']} failed")
    page = f"{cmd} --report-only" if args.report_only else ""
    grid = grid_cells(methods, targets, list(opt["seeds"]))
    d = write_leaderboard(opt["cells_dir"], budget, grid, opt["out"], figure=not args.no_figure, page_command=page)
    print(
        f"leaderboard: {opt['out']} (+ .json); {len(d['missing'])} cells missing, {len(d['stale'])} stale, "
        f"{len(d['failed'])} failed"
    )
    return 0


def _provenance(path: str) -> str:
    """``<path> at commit <hash>`` (the last commit that changed the file), or the path alone outside git."""
    from fewstep.core.io import git_commit

    h = git_commit(path, short=True)
    return f"{path} at commit {h}" if h else path
