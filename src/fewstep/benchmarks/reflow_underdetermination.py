r"""Under-determination of the trajectory loss (docs/methods.md §4): equal loss, different endpoint marginals.

Teacher window map Ψ = id on p = N(0, I₂): a rotation R_α (flow of u = αJx) and a translation by c with
‖c‖² = 4(1 - cos α) have equal trajectory loss E‖Φ(x) - x‖² but KL 0 vs ‖c‖²/2 (both measured with the
log-density machinery). On ring8 the same construction on a trained reflow student: Φ_A = R_{π/4}∘Φ (ring8 is
invariant under 45° rotations) and Φ_B = Φ + c with ‖c‖ chosen so that both have the same endpoint regression
loss E‖Φ(x_1) - x_0‖² on the teacher pairs. Part (a) of :mod:`fewstep.benchmarks.reflow_experiments`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fewstep.core.flowmap import FlowMap, VelocityFlowMap
from fewstep.core.utils import as_time, per_sample_sq_norm
from fewstep.methods._shared.alignment import window_logdensity
from fewstep.sampling.logdensity import standard_normal_logprob
from fewstep.teachers.presets import load_preset

__all__ = ["rotation_vs_translation", "ring8_underdetermination"]


def rotation_vs_translation(alpha: float = math.pi / 3, n: int = 20000, seed: int = 0) -> dict[str, float]:
    r"""§1.2: rotation (u = αJx, integrated with RK4 and exact divergence) vs translation c, ‖c‖² = 4(1 - cos α).

    Returns trajectory losses E‖Φ(x) - x‖² and KL(Φ#p ‖ p) = E[log p(x) + Δ - log p(Φ(x))] for both.
    """
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jmat = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([math.sqrt(4 * (1 - math.cos(alpha))), 0.0], dtype=torch.float64)
    # sampling runs t: 1 -> 0, so dx/dt = -alpha J x rotates by +alpha over the unit window
    rot = VelocityFlowMap(lambda z, t, cond=None: -alpha * z @ jmat.T)
    shift = VelocityFlowMap(lambda z, t, cond=None: -c.expand_as(z) + 0 * z)
    out: dict[str, float] = {"alpha": alpha, "c_norm2": float(c @ c)}
    for name, f, mode in (("rotation", rot, "exact"), ("translation", shift, "jump")):
        y, delta = window_logdensity(f, x, as_time(1.0, x), as_time(0.0, x), mode=mode, substeps=16,
                                     solver="rk4", create_graph=False)
        out[f"traj_loss_{name}"] = float(per_sample_sq_norm(y - x).mean())
        out[f"kl_{name}"] = float((standard_normal_logprob(x) + delta - standard_normal_logprob(y)).mean())
    return out


def ring8_underdetermination(student: FlowMap, pairs: Any, n: int = 2000, seed: int = 0) -> dict[str, float]:
    r"""Φ_A = R_{π/4}∘Φ vs Φ_B = Φ + c on ring8 with equal endpoint loss E‖Φ(x_1) - x_0‖² (c solves it exactly)."""
    from fewstep.evaluation.evaluate import evaluate_samples

    teacher = load_preset("ring8")
    x1, x0 = pairs.x1[:n].double(), pairs.x0[:n].double()
    student = student.double()
    with torch.no_grad():
        y = student(x1, 1.0, 0.0)
    a = math.pi / 4
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    ya = y @ rot.T
    loss_a = float(per_sample_sq_norm(ya - x0).mean())
    r = y - x0  # loss_B(c) = E‖r + c‖² = E‖r‖² + 2 c·E r + ‖c‖²: put c along a fixed direction, solve the quadratic
    e = torch.tensor([math.cos(0.3), math.sin(0.3)], dtype=torch.float64)
    b, c0 = float(2 * r.mean(0) @ e), float(per_sample_sq_norm(r).mean()) - loss_a
    lam = (-b + math.sqrt(max(b * b - 4 * c0, 0.0))) / 2
    yb = y + lam * e
    loss_b = float(per_sample_sq_norm(yb - x0).mean())
    ma, mb = evaluate_samples(ya, teacher, seed=seed), evaluate_samples(yb, teacher, seed=seed)
    student.float()
    return {"loss_A_rotation": loss_a, "loss_B_translation": loss_b, "mmd2_A": ma["mmd2"], "mmd2_B": mb["mmd2"],
            "loglik_A": ma["mean_loglik"], "loglik_B": mb["mean_loglik"], "shift_norm": lam}
