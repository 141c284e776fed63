r"""Which distribution does score distillation with a CFG-guided real score aim at? (2-D conditional teachers.)

The distribution-matching losses (DMD, DMD2, decoupled DMD, CDM) move the student until the scores of its
re-noised samples match the guided score :math:`\nabla\log p_\tau(x|c) + (w-1)\nabla(\log p_\tau(x|c) - \log
p_\tau(x))` at the sampled noise levels τ. At a single level τ the distribution with exactly that score is the
*tilted* marginal

.. math::  q_{w,\tau}(x\,|\,c) \propto p_\tau(x\,|\,c)^{w}\, p_\tau(x)^{1-w},

and as τ → 0 the re-noised student is the student itself, so :math:`q_{w,0}` is what the small-τ part of the loss
pulls the samples towards. The issue's guided *target*, by contrast, is the endpoint of the guided teacher ODE
(adaptive solver), which is shaped by the guided field at large t and is not the tilted density of any single τ.

This command samples :math:`q_{w,0}` exactly on a fine grid (2-D only: categorical draw of a grid cell from the
exact log-density, then a uniform jitter inside the cell) and reports its MMD² to the guided-ODE target and to the
exact w = 1 conditional mixture, with the same labels, references, metric and shape statistics (mean radius r,
along-ring sd t-sd) as ``fewstep.benchmarks.dmd_experiments``. If :math:`q_{w,0}` sits on the w = 1 side, a
DM-family student that matches the guided score at small τ cannot reach the guided-ODE target.

Run: ``python -m fewstep.benchmarks.guided_targets --preset ring8 --w 3 --seeds 0 1 2 --out docs/results`` (writes
guided_targets_<preset>.md/json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.benchmarks.dmd_experiments import references, score, summarise
from fewstep.sampling.samplers import solve
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.presets import load_preset

__all__ = ["tilted_log_density", "sample_tilted"]


def tilted_log_density(teacher: GaussianMixtureTeacher, x: Tensor, cond: Tensor, w: float,
                       t: float = 0.0) -> Tensor:
    r"""Unnormalised :math:`\log q_{w,t}(x|c) = w\log p_t(x|c) + (1-w)\log p_t(x)`, shape (batch,), float64.

    Its gradient in x is the CFG-guided score :math:`s_u + w(s_c - s_u)` at time t.
    """
    x = x.to(torch.float64)
    uncond = torch.full_like(cond, -1)
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float64)
    return (w * teacher.log_prob(x, tt, cond=cond) + (1.0 - w) * teacher.log_prob(x, tt, cond=uncond)).to(
        torch.float64)


def sample_tilted(teacher: GaussianMixtureTeacher, cond: Tensor, w: float, t: float = 0.0, box: float = 3.5,
                  cell: float = 0.005, generator: torch.Generator | None = None,
                  cache: dict[Any, Tensor] | None = None) -> Tensor:
    r"""Exact-to-grid-accuracy samples of :math:`q_{w,t}(\cdot|c)` for a 2-D teacher, one per label in ``cond``.

    Args:
        teacher: A class-conditional 2-D mixture.
        cond: Labels, shape (n,).
        w: Guidance weight (w = 1 gives the conditional mixture itself).
        t: Noise level of the tilted marginal.
        box: Half-width of the square grid [-box, box]²; the mass outside must be negligible.
        cell: Grid spacing; the sample error is at most one cell (uniform jitter inside the drawn cell).
        generator: CPU generator.
        cache: Optional dict that keeps each class's grid CDF between calls (same teacher, w, t, box, cell).

    Returns:
        Samples of shape (n, 2), float64.
    """
    if teacher.dim != 2 or teacher.num_classes is None:
        raise ValueError("sample_tilted needs a class-conditional 2-D mixture teacher")
    if cond.dim() != 1:
        raise ValueError(f"cond must have shape (n,); got {tuple(cond.shape)}")
    m = int(round(2 * box / cell))
    axis = -box + cell * (torch.arange(m, dtype=torch.float64) + 0.5)
    grid = torch.cartesian_prod(axis, axis)  # (m*m, 2) cell centres
    out = torch.empty(cond.shape[0], 2, dtype=torch.float64)
    for c in cond.unique().tolist():
        rows = (cond == c).nonzero()[:, 0]
        key = (id(teacher), c, float(w), float(t), float(box), float(cell))
        if cache is None or key not in cache:
            logq = torch.cat([tilted_log_density(teacher, g, torch.full((g.shape[0],), c, dtype=torch.long), w, t)
                              for g in grid.split(262_144)])
            sq = logq.reshape(m, m)
            edge = float(torch.logsumexp(torch.cat([sq[[0, -1]].flatten(), sq[:, [0, -1]].flatten()]), 0))
            if edge - float(torch.logsumexp(logq, 0)) > -20.0:
                raise ValueError(f"the tilted density of class {c} has mass at the edge of the box ±{box}; widen it")
            cdf = torch.cumsum(torch.softmax(logq, 0), 0)
            if cache is not None:
                cache[key] = cdf
        else:
            cdf = cache[key]
        u = torch.rand(rows.numel(), generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u * cdf[-1]).clamp(max=cdf.numel() - 1)
        jitter = (torch.rand(rows.numel(), 2, generator=generator, dtype=torch.float64) - 0.5) * cell
        out[rows] = grid[idx] + jitter
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ring8")
    p.add_argument("--w", type=float, default=3.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=float, default=3.5, help="half-width of the sampling grid")
    p.add_argument("--cell", type=float, default=0.005, help="grid spacing")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    teacher = load_preset(args.preset, conditional=True)
    rows: dict[str, list[dict[str, float]]] = {}
    cache: dict[Any, Tensor] = {}
    for seed in args.seeds:
        refs = references(teacher, args.w, args.n, seed)
        g = torch.Generator().manual_seed(20_000 + seed)
        found: dict[str, Tensor] = {"guided ODE, adaptive (floor)": refs["adaptive"],
                                    "guided Euler 16": solve(teacher, refs["z"], 16, cond=refs["cond"],
                                                             guidance=args.w).x,
                                    "exact w=1 conditional mixture": teacher.sample(args.n, cond=refs["cond"],
                                                                                    generator=g,
                                                                                    dtype=torch.float64)}
        found[f"tilted q_(w={args.w:g}, tau=0)"] = sample_tilted(teacher, refs["cond"], args.w, 0.0, args.box,
                                                                 args.cell, generator=g, cache=cache)
        found["tilted q_(w=1, tau=0) (grid check)"] = sample_tilted(teacher, refs["cond"], 1.0, 0.0, args.box,
                                                                           args.cell, generator=g, cache=cache)
        for name, x in found.items():
            rows.setdefault(name, []).append(score(x, refs, teacher))
            print(f"seed {seed} {name:44s} guided {rows[name][-1]['mmd2']:.4f} w=1 {rows[name][-1]['mmd2_w1']:.4f}",
                  flush=True)
    keys = ("mmd2", "mmd2_w1", "radius", "tangential_sd")
    cmd = "python -m fewstep.benchmarks.guided_targets " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{cmd}`", "", f"Seeds {args.seeds}; {args.n} samples each; MMD² and shape statistics as in "
             "dmd.md (same labels and references).", "",
             "| samples | MMD² to guided-ODE target | MMD² to w=1 mixture | r | t-sd |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(summarise([r[k] for r in v]) for k in keys) + " |"
              for name, v in rows.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"guided_targets_{args.preset}.md").write_text(text)
    (out / f"guided_targets_{args.preset}.json").write_text(json.dumps({"command": cmd, "w": args.w, "rows": rows},
                                                                     indent=1))


if __name__ == "__main__":
    main()
