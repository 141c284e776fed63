"""How good is the MA log-density estimate of an image reflow student (docs/results/images_reflow_ma.md)?

For ``--n`` evaluation noises x1 (image_bench's seed-0 noise and balanced labels) and a run's EMA student, the window
[0, 1] log-density change Δ of the student's ODE (``window_logdensity``) with: the training setting (Hutchinson,
``--probes`` Rademacher probes held along the path, ``--substeps`` RK4 sub-steps), the exact divergence (64 backward
passes) at the same sub-steps, and the exact divergence at ``--ref-substeps`` (reference); plus the one-jump
(1-NFE sampler) log|det| and its fold share, the only Δ that needs injectivity.

``python tools/image_ma_density.py RUN [RUN ...] [--n 64] [--substeps 2] [--probes 1] [--ref-substeps 8]``
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fewstep.config.build import load_run_student
from fewstep.evaluation.image_features import eval_noise
from fewstep.methods._shared.alignment import window_logdensity
from fewstep.sampling.logdensity import make_probes


def main() -> None:
    """Print one markdown row per run."""
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--substeps", type=int, default=2)
    p.add_argument("--probes", type=int, default=1)
    p.add_argument("--ref-substeps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"| run | Δ ref (exact, RK4 x {a.ref_substeps}) mean ± sd | exact, RK4 x {a.substeps}: mean abs(Δ − ref) | "
          f"Hutchinson K={a.probes}, RK4 x {a.substeps}: mean abs(Δ − ref) (sd of Δ − ref) | "
          f"x_end RMS diff RK4 x {a.substeps} vs x {a.ref_substeps} | one-jump fold share |")
    print("|---|---|---|---|---|---|")
    for run in a.runs:
        st = load_run_student(run, ema=True)
        x1, cond = eval_noise(a.n, st.net.event_shape, st.net.num_classes, 0)
        ts, te = torch.ones(a.n), torch.zeros(a.n)
        g = torch.Generator().manual_seed(0)
        probes = make_probes(x1, a.probes, g)
        xr, dr = window_logdensity(st, x1, ts, te, cond, "exact", a.ref_substeps, "rk4", None, False)
        xe, de = window_logdensity(st, x1, ts, te, cond, "exact", a.substeps, "rk4", None, False)
        _, dh = window_logdensity(st, x1, ts, te, cond, "hutchinson", a.substeps, "rk4", probes, False)
        stats: dict[str, float] = {}
        window_logdensity(st, x1, ts, te, cond, "jump", 1, "rk4", None, False, stats=stats)
        err_h = (dh - dr).tolist()
        rms = float((xe - xr).pow(2).mean().sqrt())
        print(f"| {run} | {float(dr.mean()):.2f} ± {float(dr.std()):.2f} | {float((de - dr).abs().mean()):.3f} | "
              f"{statistics.fmean(abs(e) for e in err_h):.2f} ({statistics.stdev(err_h):.2f}) | {rms:.4f} | "
              f"{stats['folded']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
