"""``fewstep sample``: draw samples from a trained run with the sampler it was trained for (see :mod:`fewstep.cli`)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.cli_eval import check_nfe, run_sampler
from fewstep.config.build import load_run
from fewstep.evaluation.figures import save_figure
from fewstep.sampling.image_grid import class_grid_samples, save_grid
from fewstep.sampling.spec import sample_with

__all__ = ["run_sample"]


def run_sample(args: argparse.Namespace) -> int:
    """``fewstep sample RUN_DIR ...``: samples (.npy + .json + .png) or, with ``--class-grid``, a class-row grid.

    Args:
        args: The parsed ``sample`` arguments.

    Returns:
        Exit status 0.

    Raises:
        ValueError: On a bad count, label or option combination.
        FloatingPointError: If the student produces NaN/inf samples.
        NotADirectoryError: If ``--out`` lies under a file.
    """
    torch.set_num_threads(args.threads)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1 (number of samples); got {args.n}")
    check_nfe([args.nfe])
    run = load_run(args.run_dir)
    student = run.student(ema=not args.raw)
    spec, grid = run_sampler(run, args.gamma, args.grid)
    if args.class_grid:
        return _sample_class_grid(args, run.step, student, spec, grid)
    cond = _labels(student, args.label, args.n)
    g = torch.Generator().manual_seed(args.seed)
    x1 = torch.randn(args.n, *tuple(student.net.event_shape), generator=g)
    res = sample_with(student, x1, spec, args.nfe, grid=grid, cond=cond, seed=args.seed,
                      allow_nonzero_end=args.allow_partial)
    if not bool(torch.isfinite(res.x).all()):
        raise FloatingPointError(f"the student at ckpt-{run.step} produced NaN/inf samples (a diverged run)")
    out = Path(args.out or Path(args.run_dir) / f"samples-nfe{res.nfe}")
    bad = next((p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise NotADirectoryError(f"--out {str(out)!r}: {str(bad)!r} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), res.x.numpy())
    meta = {"run_dir": str(args.run_dir), "checkpoint_step": run.step, "ema": not args.raw and bool(run.ema_students),
            "sampler": spec.to_dict(), "times": res.times.tolist(), "nfe": res.nfe, "n": args.n, "seed": args.seed,
            "label": args.label}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"loaded ckpt-{run.step} of {args.run_dir} ({'EMA' if meta['ema'] else 'raw'} weights); "
          f"sampler {spec.describe()}")
    print(f"wrote {out.with_suffix('.npy')} ({args.n} samples, {res.nfe} NFE) and {out.with_suffix('.json')}")
    png = save_figure(res.x, out.with_suffix(".png"), f"{Path(args.run_dir).name}: {res.nfe} NFE")
    if png is not None:
        print(f"wrote {png}")
    if args.decode:  # latent students of a diffusers teacher whose folder has a VAE
        decode = getattr(run.teacher, "decode", None)
        if decode is None:
            raise ValueError("--decode needs a teacher with a VAE (teacher.kind=diffusers with a vae folder)")
        dec = out.parent / f"{out.name}-decoded.npy"
        np.save(dec, decode(res.x).numpy())
        print(f"wrote {dec} (decoded through the teacher's VAE)")
    return 0


def _sample_class_grid(args: argparse.Namespace, step: int, student: Any, spec: Any, grid: Any) -> int:
    """``fewstep sample --class-grid K1 K2 ...``: a PNG with one row per class and one column per NFE."""
    k = getattr(student.net, "num_classes", None)
    if not k or len(tuple(student.net.event_shape)) != 3:
        raise ValueError("--class-grid needs a class-conditional image student (event shape (C, H, W))")
    if grid is not None:
        raise ValueError("--class-grid sets the step counts: give --grid only as a rule name (uniform, edm, power:P)")
    check_nfe(args.class_grid)
    cols = class_grid_samples(student, spec, args.class_grid, int(k), per_cell=2, seed=args.seed)
    out = Path(args.out or Path(args.run_dir) / "class-grid").with_suffix(".png")
    print(f"loaded ckpt-{step} of {args.run_dir}; sampler {spec.describe()}")
    print(f"wrote {save_grid(cols, out, num_classes=int(k), per_cell=2)} (rows: classes 0..{k - 1}; "
          f"columns: NFE {' '.join(map(str, args.class_grid))})")
    return 0


def _labels(student: object, label: int | None, n: int) -> torch.Tensor | None:
    """Class labels for sampling: checked against the student's classes; warns for a conditional one without."""
    k = getattr(getattr(student, "net", None), "num_classes", None)
    if label is None:
        if k:
            warnings.warn(f"this student is class-conditional ({k} classes) and no --label was given: sampling "
                          "the unconditional (null-class) model", UserWarning, stacklevel=2)
        return None
    if not k:
        raise ValueError(f"--label {label}: this student is unconditional (trained without labels)")
    if not 0 <= label < k:
        raise ValueError(f"--label must lie in 0..{k - 1} for this student; got {label}")
    return torch.full((n,), label, dtype=torch.long)
