r"""Statistics of the MA experiments: t-intervals over seeds, paired comparisons, claim (i) pairs, rank correlation.

* :func:`t_interval`: mean ± :math:`t_{0.975, n-1}\,s/\sqrt n` (95 %);
* :func:`paired`: the seed-paired difference MA − baseline with its 95 % t-interval and a verdict (``better``,
  ``worse`` or ``tie`` when the interval contains 0: at 5 seeds every difference under 2.78 SE is a tie);
* :func:`spearman_ci`: Spearman's ρ with a percentile bootstrap interval over students;
* :func:`claim_i_pairs`: pairs of trained students whose held-out FM-on-pairs losses agree (paired difference
  within one standard error) ranked by how far apart their sample marginals are.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["t_interval", "paired", "spearman_ci", "claim_i_pairs", "metric", "LOWER_IS_BETTER"]

LOWER_IS_BETTER = {
    "mmd2": True,
    "mmd2_teacher": True,
    "fd": True,
    "kl_knn": True,
    "tv_knn": True,
    "kl_is": True,
    "tv_is": True,
    "loglik": False,
    "fm_loss": True,
    "sum_eps": True,
    "tv_final": True,
}


def _tq(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else math.inf


def t_interval(vals: Sequence[float]) -> tuple[float, float, int]:
    """(mean, 95 % half-width, n) of ``vals`` (half-width inf for n < 2)."""
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan, 0
    if len(v) < 2:
        return v[0], math.inf, 1
    return statistics.fmean(v), _tq(len(v)) * statistics.stdev(v) / math.sqrt(len(v)), len(v)


def metric(run: dict[str, Any], name: str, nfe: int = 1) -> float | None:
    """One metric of a run record: per-NFE sample metrics, ``fm_loss``, or the TV-bound fields."""
    if name == "fm_loss":
        return run.get("fm_loss")
    if name in ("sum_eps", "tv_final"):
        return run.get("tv_bound", {}).get(name)
    ev = {int(k): v for k, v in run["eval"].items()}
    return ev.get(nfe, {}).get(name)


def paired(ma: dict[int, float], base: dict[int, float], lower_is_better: bool = True) -> dict[str, Any]:
    """Seed-paired difference ma − base: mean, 95 % half-width, SE, n, verdict (better/worse/tie for MA)."""
    seeds = sorted(set(ma) & set(base))
    d = [ma[s] - base[s] for s in seeds if ma[s] is not None and base[s] is not None]
    m, hw, n = t_interval(d)
    se = hw / _tq(n) if n > 1 else math.inf
    verdict = "tie"
    if n > 1 and abs(m) > hw:
        verdict = "better" if (m < 0) == lower_is_better else "worse"
    b = statistics.fmean([base[s] for s in seeds]) if seeds else math.nan
    rel = m / b if seeds and b else math.nan
    return {"diff": m, "hw": hw, "se": se, "n": n, "verdict": verdict, "rel": rel, "base": b}


def spearman_ci(x: Sequence[float], y: Sequence[float], boots: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman's ρ(x, y) with a 95 % percentile bootstrap interval (resampling the (x, y) pairs)."""
    from scipy.stats import spearmanr

    xs, ys = torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64)
    rho = float(spearmanr(xs.numpy(), ys.numpy()).statistic)
    g = torch.Generator().manual_seed(seed)
    rs = []
    for _ in range(boots):
        i = torch.randint(0, len(xs), (len(xs),), generator=g)
        r = spearmanr(xs[i].numpy(), ys[i].numpy()).statistic
        if math.isfinite(float(r)):
            rs.append(float(r))
    rs.sort()
    if not rs:  # constant input: rho undefined in every resample
        return {"rho": rho, "lo": math.nan, "hi": math.nan, "n": float(len(xs))}
    return {"rho": rho, "lo": rs[int(0.025 * len(rs))], "hi": rs[int(0.975 * len(rs)) - 1], "n": float(len(xs))}


def claim_i_pairs(losses: dict[str, torch.Tensor], score: dict[str, float], top: int = 3) -> list[dict[str, Any]]:
    """Student pairs with matched held-out pair loss (|paired mean diff| ≤ 1 SE), largest ``score`` gap first.

    Args:
        losses: Student key -> per-pair held-out FM losses on the same pairs and times.
        score: Student key -> a marginal discrepancy (e.g. 1-NFE MMD²) from one evaluation.
        top: Number of pairs returned.

    Returns:
        Dicts with keys a, b, loss_a, loss_b, dloss, dloss_se, score_a, score_b.
    """
    keys = sorted(k for k in losses if k in score)
    cands = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            d = (losses[a] - losses[b]).double()
            m, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
            if abs(m) <= se:
                cands.append(
                    {
                        "a": a,
                        "b": b,
                        "loss_a": float(losses[a].mean()),
                        "loss_b": float(losses[b].mean()),
                        "dloss": m,
                        "dloss_se": se,
                        "score_a": score[a],
                        "score_b": score[b],
                    }
                )
    cands.sort(key=lambda c: -abs(c["score_a"] - c["score_b"]) / max(min(c["score_a"], c["score_b"]), 1e-12))
    out, used = [], set()
    for c in cands:  # distinct students
        if c["a"] in used or c["b"] in used:
            continue
        used |= {c["a"], c["b"]}
        out.append(c)
        if len(out) == top:
            break
    return out
