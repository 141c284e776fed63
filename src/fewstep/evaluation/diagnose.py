r"""Diagnose the telescoping TV bound of a few-step student of an analytic teacher (docs/methods.md §5).

Windows :math:`1 = t_0 > \dots > t_K`; the student's window map :math:`\Phi_k` is its jump (or sub-stepped ODE)
from :math:`t_k` to :math:`t_{k+1}`. With :math:`q_{t_0} = p_1` and :math:`q_{t_{k+1}} = \Phi_k\#q_{t_k}`,

.. math::
    TV(q_{t_K}, p_{t_K}) \le \sum_k \varepsilon_k \le \sum_k \sqrt{KL_k/2},\qquad
    \varepsilon_k = TV(\Phi_k\#p_{t_k}, p_{t_{k+1}}),\quad KL_k = KL(\Phi_k\#p_{t_k}\,\|\,p_{t_{k+1}}).

Each term is estimated by importance sampling from :math:`y = \Phi_k(x)`, :math:`x \sim p_{t_k}` (exact
mixture samples) with :math:`\log q(y) = \log p_{t_k}(x) + \Delta(x)`
(:func:`fewstep.methods._shared.alignment.window_logdensity`: the exact jump log-determinant, or the divergence
integral exact/Hutchinson) and the exact :math:`\log p_{t_{k+1}}`:
:math:`TV = E_q[(1 - p/q)_+]`, :math:`KL = E_q[\log q - \log p]`. The final :math:`TV(q_{t_K}, p_{t_K})` uses
the student's own multi-step samples from noise with their chained log-density. Hutchinson gives a noisy
log q, which biases TV; prefer ``jump`` (exact) whenever the per-sample Jacobian fits.

Folds (:mod:`fewstep.sampling.jump_density`). In ``jump`` mode every term records ``fold_fraction`` (share of
samples with det ∂Φ/∂x <= 0) and the density check ``w_mean`` ± ``w_se`` = :math:`E_q[p/q]` (<= 1 for a valid
density). A folding window map has no change-of-variables density: its ε_k, KL_k (and the final TV when any
window folds) are then the density-free k-NN estimates of :func:`fewstep.evaluation.valid_kl.valid_kl_tv`
(``kl_from_cov`` = 0; 2-3-D), whose upward noise is given by ``eps_floor`` (the same estimator on exact samples);
in higher dimension they are NaN and ``valid`` is False.

CLI: ``fewstep diagnose tv --run RUN_DIR`` (wired through :func:`add_tv_parser` / :func:`main_tv`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.utils import as_time
from fewstep.evaluation.valid_kl import valid_kl_tv
from fewstep.methods._shared.alignment import MA_MODES, resolve_mode, window_logdensity
from fewstep.sampling.jump_density import jump_logdet
from fewstep.sampling.logdensity import make_probes, standard_normal_logprob
from fewstep.sampling.samplers import check_grid, time_grid

__all__ = ["diagnose_tv", "format_tv_table", "add_tv_parser", "main_tv"]


def _grid(windows: int | Sequence[float] | Tensor) -> Tensor:
    if isinstance(windows, int):
        if windows < 1:
            raise ValueError(f"windows must be >= 1; got {windows}")
        return time_grid(windows)
    try:
        g = check_grid(windows)
    except ValueError as e:
        raise ValueError(f"windows must be a decreasing grid starting at 1 and ending >= 0: {e}") from None
    if float(g[0]) != 1.0:
        raise ValueError(f"windows must be a decreasing grid starting at 1 and ending >= 0; got {g.tolist()}")
    return g


def _push(student: Any, x: Tensor, t0: float, t1: float, mode: str, substeps: int, solver: str, probes: int,
          gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(Phi(x), Delta, folded) without graphs, Delta = log q_{t1}(Phi(x)) - log q_{t0}(x).

    ``folded`` marks the rows where some jump has det <= 0 (always False for the ODE modes, whose flow is a
    diffeomorphism). The jump sub-grid is that of :func:`~fewstep.methods._shared.alignment.window_logdensity`.
    """
    folded = torch.zeros(x.shape[0], dtype=torch.bool)
    if mode == "jump":
        delta = torch.zeros(x.shape[0], dtype=x.dtype)
        ts, te = as_time(t0, x), as_time(t1, x)
        for i in range(substeps):
            j = jump_logdet(student, x, ts + (te - ts) * (i / substeps), ts + (te - ts) * ((i + 1) / substeps))
            x, delta, folded = j.y, delta - j.logabsdet, folded | (j.sign <= 0).cpu()
        return x.detach(), delta.detach(), folded
    pr = make_probes(x, probes, gen) if resolve_mode(mode, x) == "hutchinson" else None
    y, delta = window_logdensity(student, x, as_time(t0, x), as_time(t1, x), None, mode, substeps, solver, pr,
                                 create_graph=False)
    return y.detach(), delta.detach(), folded


def _valid(y: Tensor, lq: Tensor, teacher: Any, t: float, folded: Tensor, gen: torch.Generator) -> dict[str, Any]:
    """KL/TV of samples y (claimed log q = lq) against p_t by the valid route, with the fold and density checks."""
    fold = float(folded.double().mean())
    floor = teacher.sample(y.shape[0], t, generator=gen, dtype=y.dtype) if fold > 0 else None
    out = valid_kl_tv(y, lq, lambda z: teacher.log_prob(z, t), fold, floor=floor, max_dim=3 if fold > 0 else 0)
    if "kl" not in out:
        out.update({"kl": math.nan, "kl_se": math.nan, "tv": math.nan, "tv_se": math.nan, "kl_from_cov": 0.0})
    return out


def diagnose_tv(student: Any, teacher: Any, windows: int | Sequence[float] | Tensor = 4, n: int = 2000,
                seed: int = 0, mode: str = "jump", substeps: int = 1, solver: str = "euler", probes: int = 4,
                dtype: torch.dtype = torch.float64, verbose: bool = True) -> dict[str, Any]:
    r"""Estimate every :math:`\varepsilon_k`, :math:`KL_k` and the final TV of ``student`` against ``teacher``.

    Args:
        student: Flow map ``student(x, t, s, cond)`` (``velocity`` too for the ODE modes).
        teacher: Analytic teacher with ``sample(n, t, generator=...)`` and ``log_prob(x, t)``.
        windows: K uniform windows or a decreasing grid from 1.
        n: Samples per term.
        seed: Seed of the samples and probes.
        mode: ``jump`` (exact log-det of the student's jumps; its actual sampler), ``exact`` or ``hutchinson``.
        substeps: Sub-steps per window (jump: M jumps; ODE modes: M solver steps).
        solver: euler/heun/rk4 for the ODE modes.
        probes: Hutchinson probes.
        dtype: Computation dtype (the student is cast to it temporarily when it has parameters).
        verbose: Print the table.

    Returns:
        Dict with ``windows``, per-window ``terms`` (t_start, t_end, eps, eps_se, kl, kl_se, fold_fraction,
        w_mean, w_se, kl_from_cov and, for folding windows, eps_floor), ``sum_eps``, ``sum_sqrt_kl_half``,
        ``tv_final``, ``tv_final_se``, ``kl_final``, ``final_fold_fraction``, ``final_w_mean``,
        ``final_w_se``, ``slack`` = sum_eps - tv_final, ``holds`` (tv_final <= sum_eps + 2 combined standard
        errors), ``holds_strict`` and ``valid`` (every estimate exists: False for folds above 3-D).
    """
    if mode not in MA_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MA_MODES}")
    for attr in ("sample", "log_prob"):
        if not hasattr(teacher, attr):
            raise ValueError(f"diagnose_tv needs an analytic teacher with {attr}(); got {type(teacher).__name__}")
    g = _grid(windows)
    gen = torch.Generator().manual_seed(int(seed))
    params = list(student.parameters()) if hasattr(student, "parameters") else []
    old_dtype = params[0].dtype if params else None
    if params:
        student.to(dtype)
    try:
        terms = []
        for k in range(len(g) - 1):
            t0, t1 = float(g[k]), float(g[k + 1])
            x = teacher.sample(n, t0, generator=gen, dtype=dtype)
            y, delta, folded = _push(student, x, t0, t1, mode, substeps, solver, probes, gen)
            lq = teacher.log_prob(x, t0).to(dtype) + delta
            kt = _valid(y, lq, teacher, t1, folded, gen)
            terms.append({"t_start": t0, "t_end": t1, "eps": kt["tv"], "eps_se": kt["tv_se"], "kl": kt["kl"],
                          "kl_se": kt["kl_se"], "fold_fraction": kt["fold_fraction"], "w_mean": kt["w_mean"],
                          "w_se": kt["w_se"], "kl_from_cov": kt["kl_from_cov"],
                          **({"eps_floor": kt["tv_knn_floor"]} if "tv_knn_floor" in kt else {})})
        x = torch.randn((n, *teacher.event_shape), generator=gen, dtype=dtype)
        lq = standard_normal_logprob(x)
        folded_all = torch.zeros(n, dtype=torch.bool)
        for k in range(len(g) - 1):
            x, delta, folded = _push(student, x, float(g[k]), float(g[k + 1]), mode, substeps, solver, probes, gen)
            lq, folded_all = lq + delta, folded_all | folded
        final = _valid(x, lq, teacher, float(g[-1]), folded_all, gen)
    finally:
        if params and old_dtype is not None:
            student.to(old_dtype)
    sum_eps = sum(t["eps"] for t in terms)
    se = math.sqrt(sum(t["eps_se"] ** 2 for t in terms) + final["tv_se"] ** 2)
    out: dict[str, Any] = {
        "windows": g.tolist(), "n": n, "seed": seed, "mode": mode, "substeps": substeps, "terms": terms,
        "sum_eps": sum_eps, "sum_sqrt_kl_half": sum(math.sqrt(max(t["kl"], 0.0) / 2) for t in terms),
        "tv_final": final["tv"], "tv_final_se": final["tv_se"], "kl_final": final["kl"],
        "final_fold_fraction": final["fold_fraction"], "final_w_mean": final["w_mean"], "final_w_se": final["w_se"],
        "slack": sum_eps - final["tv"], "holds": final["tv"] <= sum_eps + 2 * se,
        "holds_strict": final["tv"] <= sum_eps,
        "valid": all(math.isfinite(t["eps"]) for t in terms) and math.isfinite(final["tv"]),
    }
    if verbose:
        print(format_tv_table(out))
    return out


def format_tv_table(res: dict[str, Any]) -> str:
    """A markdown table of a :func:`diagnose_tv` result."""
    lines = ["| window | eps_k = TV | KL_k | sqrt(KL_k/2) | folded | E_q[p/q] | estimate |",
             "|---|---|---|---|---|---|---|"]
    for t in res["terms"]:
        how = "change of variables" if t.get("kl_from_cov", 1.0) else \
            f"k-NN (TV floor {t['eps_floor']:.3f})" if "eps_floor" in t else "none (folds, d > 3)"
        lines.append(f"| [{t['t_end']:.3g}, {t['t_start']:.3g}] | {t['eps']:.4f} ± {t['eps_se']:.4f} | "
                     f"{t['kl']:.4f} ± {t['kl_se']:.4f} | {math.sqrt(max(t['kl'], 0.0) / 2):.4f} | "
                     f"{t.get('fold_fraction', 0.0):.1%} | {t.get('w_mean', math.nan):.3f} ± "
                     f"{t.get('w_se', math.nan):.3f} | {how} |")
    lines.append(f"| **sum** | {res['sum_eps']:.4f} | | {res['sum_sqrt_kl_half']:.4f} | | | |")
    lines.append(f"\nTV(q_final, p_final) = {res['tv_final']:.4f} ± {res['tv_final_se']:.4f} "
                 f"(KL {res['kl_final']:.4f}; folded {res.get('final_fold_fraction', 0.0):.1%}, E_q[p/q] "
                 f"{res.get('final_w_mean', math.nan):.3f} ± {res.get('final_w_se', math.nan):.3f}); "
                 f"bound sum eps_k = {res['sum_eps']:.4f}; holds: {res['holds']} (strict: {res['holds_strict']})")
    return "\n".join(lines)


def add_tv_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tv`` sub-command (``fewstep diagnose tv``) to an argparse sub-parser collection."""
    p = subparsers.add_parser("tv", help="telescoping TV bound of a trained student of an analytic teacher")
    p.add_argument("--run", required=True, help="run folder (config.yaml + checkpoints)")
    p.add_argument("--windows", default="", help="K uniform windows or comma-separated grid; default: NFE of "
                   "the method (perflow windows) or 1")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="jump", choices=MA_MODES)
    p.add_argument("--substeps", type=int, default=1)
    p.add_argument("--no-ema", action="store_true", help="use the raw student instead of the EMA copy")
    p.add_argument("--out", default="", help="write the result as JSON here (default RUN/diagnose_tv.json)")
    p.set_defaults(func=_run_tv)
    return p


def _run_tv(args: argparse.Namespace) -> int:
    from fewstep.config.build import load_run

    run = load_run(args.run)
    method, teacher = run.method, run.teacher
    student = run.student(ema=not args.no_ema)
    inner = getattr(teacher, "inner", teacher)
    if args.windows:
        parts = [float(v) for v in str(args.windows).split(",")]
        windows: Any = int(parts[0]) if len(parts) == 1 else parts
    else:
        windows = getattr(method, "grid", None)
        windows = windows.tolist() if windows is not None else 1
    res = diagnose_tv(student, inner, windows, n=args.n, seed=args.seed, mode=args.mode, substeps=args.substeps)
    out = Path(args.out) if args.out else Path(args.run) / "diagnose_tv.json"
    out.write_text(json.dumps(res, indent=1))
    return 0 if res["holds"] else 1


def main_tv(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``fewstep diagnose tv ...`` arguments (argv without the leading ``diagnose``)."""
    parser = argparse.ArgumentParser(prog="fewstep diagnose")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_tv_parser(sub)
    args = parser.parse_args(list(argv) if argv is not None else None)
    return int(args.func(args))
