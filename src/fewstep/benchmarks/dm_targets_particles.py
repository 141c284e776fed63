r"""Where does the DMD2 generator loss itself go, without a network or a trained fake score? (2-D, particles.)

DMD2's student gradient at a sample :math:`x_0` is :math:`g = (\hat x_0^f - \hat x_0^r)/n` at
:math:`x_\tau = (1-\tau)x_0 + \tau\epsilon`, :math:`\tau \sim U[t_{min}, t_{max}]`, with the real x0-prediction from
the guided teacher (weight w) and :math:`n = \max(\mathrm{mean}|\hat x_0^r - x_0|, 0.1)`
(:func:`fewstep.methods._shared.dm.dm_loss`). Here the generator is replaced by free particles (one per label) and
the fake score by the exact posterior mean of the particles' own re-noised distribution, smoothed with a Gaussian
kernel of width h and leaving the particle out:

.. math::
    \hat x_0^f(x_\tau) = \sum_{j\ne i,\,c_j = c_i} r_j\big(x_j + \tfrac{(1-\tau)h^2}{s^2}(x_\tau - (1-\tau)x_j)\big),
    \quad r_j \propto e^{-|x_\tau - (1-\tau)x_j|^2/2s^2},\ s^2 = \tau^2 + (1-\tau)^2h^2.

Each step moves every particle by :math:`-\eta\,\bar g` (mean over ``draws`` independent (τ, ε)). The particles'
fixed point is where the DMD2 loss itself settles for a generator that can move every sample freely with a fake
score that never lags: it separates the loss's own target from finite-network / finite-training effects. The
particles start from the w = 1 mixture (the students' init distribution) or from another target, and are scored
against the three targets of :mod:`fewstep.benchmarks.dm_targets` (same labels and target draws).

Run: ``python -m fewstep.benchmarks.dm_targets_particles --preset shared3 --w 2 4 --seeds 0 1 2 \
--start mixture tilted guided_ode`` (and ``--t-range 0.3:0.98``)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.benchmarks.dm_targets import score_targets, target_samples
from fewstep.benchmarks.dm_targets_report import TARGETS, fmt
from fewstep.methods._shared.dm import normaliser, renoise, teacher_x0
from fewstep.teachers.presets import load_preset

__all__ = ["fake_x0_particles", "dm_direction", "run_particles", "summary"]


def fake_x0_particles(x_tau: Tensor, tau: Tensor, x: Tensor, cond: Tensor, h: float) -> Tensor:
    """Leave-one-out, label-wise posterior mean of x0 under the particles ``x`` smoothed by N(0, h²) (see module)."""
    a = (1.0 - tau)[:, None]  # (B, 1)
    s2 = tau**2 + (1.0 - tau) ** 2 * h**2  # (B,)
    d2 = ((x_tau[:, None, :] - a[:, :, None] * x[None, :, :]) ** 2).sum(-1)  # (B, B)
    logits = -d2 / (2.0 * s2[:, None])
    same = cond[:, None] == cond[None, :]
    logits = logits.masked_fill(~same | torch.eye(x.shape[0], dtype=torch.bool), float("-inf"))
    r = torch.softmax(logits, dim=1)
    mean_x = r @ x  # Σ r_j x_j
    return mean_x + ((1.0 - tau) * h**2 / s2)[:, None] * (x_tau - a * mean_x)


def dm_direction(teacher: Any, x: Tensor, cond: Tensor, w: float, t_min: float, t_max: float, h: float,
                 floor: float = 0.1, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One draw of DMD2's per-sample gradient direction g at the particles ``x``; returns (g, τ), fresh τ and ε."""
    tau = t_min + (t_max - t_min) * torch.rand(x.shape[0], generator=gen, dtype=x.dtype)
    x_tau = renoise(x, tau, torch.randn(x.shape, generator=gen, dtype=x.dtype))
    x0_real = teacher_x0(teacher, x_tau, tau, cond, w)
    x0_fake = fake_x0_particles(x_tau, tau, x, cond, h)
    return (x0_fake - x0_real) / normaliser(x0_real, x, floor)[:, None], tau


def tau_profile(teacher: Any, x: Tensor, cond: Tensor, w: float, h: float, draws: int = 8,
                gen: torch.Generator | None = None, edges: tuple[float, ...] = (0.02, 0.2, 0.4, 0.6, 0.8, 0.98)
                ) -> dict[str, float]:
    """Share of the mean squared DM step |g|² that each τ bin carries, at τ ~ U[0.02, 0.98] (where the loss acts)."""
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    for _ in range(draws):
        g, tau = dm_direction(teacher, x, cond, w, edges[0], edges[-1], h, gen=gen)
        b = (torch.bucketize(tau, torch.tensor(edges, dtype=tau.dtype)) - 1).clamp(0, len(edges) - 2)
        sums += torch.zeros_like(sums).index_add_(0, b, g.pow(2).sum(1))
    share = sums / sums.sum()
    return {f"{lo:g}-{hi:g}": float(v) for lo, hi, v in zip(edges[:-1], edges[1:], share)}


def run_particles(teacher: Any, tg: dict[str, Tensor], start: str, w: float, t_min: float, t_max: float, h: float,
                  steps: int, lr: float, draws: int, seed: int, every: int) -> dict[str, Any]:
    """Move the particles and score them every ``every`` steps.

    They start from the second, independent draw of target ``start`` (``<start>_2``, same labels), so step 0 is
    that target's floor."""
    gen = torch.Generator().manual_seed(50_000 + seed)
    x, cond = tg[start + "_2"].clone().to(torch.float64), tg["cond"]
    trace = {"0": score_targets(x, tg)}
    profile = {"start": tau_profile(teacher, x, cond, w, h, gen=gen)}
    for k in range(1, steps + 1):
        g = sum(dm_direction(teacher, x, cond, w, t_min, t_max, h, gen=gen)[0] for _ in range(draws)) / draws
        x = x - lr * g
        if k % every == 0 or k == steps:
            trace[str(k)] = score_targets(x, tg)
    profile["final"] = tau_profile(teacher, x, cond, w, h, gen=gen)
    return {"trace": trace, "final": trace[str(steps)], "tau_share": profile}


def summary(res: dict[str, Any]) -> str:
    """Markdown rows: per run key, the particles' final MMD² to each target (mean ± 95 % CI over seeds) and the
    shares of the mean squared step g² carried by τ < 0.2 and τ > 0.6 at the start (τ ~ U[0.02, 0.98])."""
    lines = ["| run | seeds | guided ODE | tilted | w=1 mixture | g² share τ < 0.2 at start | g² share τ > 0.6 |",
             "|---|---|---|---|---|---|---|"]
    for key, per in res["runs"].items():
        recs = list(per.values())
        sh = [r["tau_share"]["start"] for r in recs]
        lo, hi = [q["0.02-0.2"] for q in sh], [q["0.6-0.8"] + q["0.8-0.98"] for q in sh]
        lines.append(f"| {key} | {len(recs)} | " + " | ".join(fmt([r["final"][t] for r in recs]) for t in TARGETS)
                     + f" | {fmt(lo)} | {fmt(hi)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shared3")
    p.add_argument("--w", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--t-range", nargs="+", default=["0.02:0.98"], help="re-noise ranges t_min:t_max")
    p.add_argument("--start", nargs="+", default=["mixture"], help="targets to start the particles from")
    p.add_argument("--h", type=float, default=0.05, help="kernel width of the fake score")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--out", default="runs/dm_targets_particles.json")
    p.add_argument("--summary", nargs="*", default=None, help="print the table of these result files and exit")
    args = p.parse_args(argv)
    if args.summary is not None:
        print("\n".join(summary(json.loads(Path(f).read_text())) for f in args.summary))
        return
    torch.set_num_threads(1)
    teacher = load_preset(args.preset, conditional=True)
    cmd = "python -m fewstep.benchmarks.dm_targets_particles " + shlex.join(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {"command": cmd, "args": vars(args), "runs": {}}
    cache: dict[Any, Tensor] = {}
    for w in args.w:
        for seed in args.seeds:
            tg = target_samples(teacher, w, args.n, seed, cache=cache)
            for rng in args.t_range:
                t_min, t_max = (float(v) for v in rng.split(":"))
                for start in args.start:
                    t0 = time.time()
                    rec = run_particles(teacher, tg, start, w, t_min, t_max, args.h, args.steps, args.lr,
                                        args.draws, seed, args.every)
                    key = f"w={w:g} tau={t_min:g}:{t_max:g} start={start}"
                    res["runs"].setdefault(key, {})[str(seed)] = rec
                    f = rec["final"]
                    print(f"{key} seed {seed}: " + " / ".join(f"{t} {f[t]:.4f}" for t in f)
                          + f" ({time.time() - t0:.0f}s)", flush=True)
                    Path(args.out).write_text(json.dumps(res, indent=1))
        cache.clear()


if __name__ == "__main__":
    main()
