r"""Per-student metrics of the MA experiments (issue 14, items 3-5): sample quality, valid densities, pair loss.

For a flow-map student f sampled with k uniform jumps from noise :math:`x_1 \sim N(0, I)`:

* ``mmd2`` (:func:`fewstep.evaluation.metrics.mmd2`) against exact mixture samples, and ``loglik`` =
  :math:`E_q[\log p_0(x)]` (exact mixture log-density of the samples);
* the change-of-variables density :math:`\log q(x) = \log N(x_1) - \sum_i \log|\det \partial f_i/\partial x|`
  is valid only for injective jumps, so every jump's :math:`\det` sign is recorded: ``fold`` = fraction of
  samples with :math:`\det < 0` in some jump (a fold), and the importance-sampled ``kl_is``/``tv_is``
  (:func:`fewstep.evaluation.metrics.kl_tv_importance`) come with the check :math:`E_q[p/q] \le 1`
  (``eq_ratio`` ± ``eq_ratio_se``), which a true density q must pass;
* density-free ``kl_knn`` / ``tv_knn`` in d <= ``knn_max_dim`` (3 by default; the sweep's ``--knn-max-dim`` raises it)
  (k-NN entropy KL and k-NN TV with the exact target log-density, :mod:`fewstep.evaluation.valid_kl`), with the
  values of exact target samples (``*_floor``): the k-NN bias grows with d, so above 3-D read them against their
  floors and only as seed-paired differences;
* ``fm_loss``: the held-out FM-on-pairs (trajectory) loss :math:`\|v_\theta(x_t, t) - (x_1 - x_0)\|^2` per pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.config.schema import load_config
from fewstep.core.paths import LinearPath
from fewstep.evaluation.metrics import kl_tv_importance, mmd2
from fewstep.sampling.jump_density import flowmap_logdensity

__all__ = [
    "BASE_CONFIG",
    "arm_config",
    "load_student",
    "sample_with_density",
    "evaluate_student",
    "heldout_fm_loss",
    "density_free",
    "mode_table",
]

# reflow2: 2-rectified flow, round 2 on a round-1 student's pairs (fewstep.benchmarks.ma_rectify)
BASE_CONFIG = {
    "reflow": "configs/reflow_ma.yaml",
    "reflow2": "configs/reflow_ma.yaml",
    "perflow": "configs/perflow_ma.yaml",
}
PAIR_METHODS = ("reflow", "reflow2")  # methods with cached pairs (``n_pairs``, ``pair_dir``)


def sample_with_density(student: Any, x1: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""k uniform jumps from noise: samples, change-of-variables :math:`\log q`, and a per-row fold flag.

    Args:
        student: Flow map ``f(x, t, s)``.
        x1: Noise, shape (n, d).
        k: Number of jumps.

    Returns:
        (x, log_q, folded) where ``folded`` is True for rows with :math:`\det < 0` in at least one jump.
    """
    r = flowmap_logdensity(student, x1, int(k))
    x, log_q, folded = r.x, r.log_q, r.folded
    return x, log_q, folded


def density_free(x: Tensor, teacher: Any, floor: Tensor) -> dict[str, float]:
    """Density-free k-NN KL(q‖p) and TV(q, p) of samples ``x`` (``kl_knn``, ``tv_knn`` with SEs) with the exact
    target log-density (:func:`fewstep.evaluation.valid_kl.density_free_kl_tv`), and their values for exact samples
    ``floor`` of the same size (``kl_knn_floor``, ``tv_knn_floor``: what a perfect sampler scores at this n).

    Args:
        x: Student samples, shape (n, d).
        teacher: Analytic mixture teacher (``log_prob``).
        floor: Exact target samples, shape (n, d).

    Returns:
        The estimates.
    """
    from fewstep.evaluation.valid_kl import density_free_kl_tv

    return density_free_kl_tv(x, log_p_fn=lambda z: teacher.log_prob(z, 0.0).to(torch.float64), floor=floor)


def evaluate_student(
    student: Any,
    teacher: Any,
    n: int = 2000,
    seed: int = 0,
    nfe: Sequence[int] = (1, 2, 4),
    density_max_dim: int = 16,
    knn_max_dim: int = 3,
) -> dict[int, dict[str, float]]:
    """All per-NFE metrics of the module docstring for one student (float64, noise seeded by ``seed``).

    Args:
        student: Flow map (cast to float64 in place).
        teacher: Analytic mixture teacher (``sample``, ``log_prob``).
        n: Samples per NFE.
        seed: Seed of the noise and (offset by 1_000_003) of the reference samples.
        nfe: Jump counts.
        density_max_dim: Change-of-variables densities (Jacobians) only up to this dimension.
        knn_max_dim: Density-free k-NN KL/TV (with their exact-sample floors) only up to this dimension.

    Returns:
        {k: metrics}.
    """
    student = student.double()
    d = teacher.dim
    x1 = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 1_000_003), dtype=torch.float64)
    out: dict[int, dict[str, float]] = {}
    for k in nfe:
        m: dict[str, float] = {}
        if d <= density_max_dim:
            x, log_q, folded = sample_with_density(student, x1, int(k))
            lp = teacher.log_prob(x, 0.0).to(torch.float64)
            kt = kl_tv_importance(log_q, lp)
            ratio = torch.exp(lp - log_q)
            m.update(
                kl_is=kt["kl"],
                kl_is_se=kt["kl_se"],
                tv_is=kt["tv"],
                tv_is_se=kt["tv_se"],
                fold=float(folded.double().mean()),
                eq_ratio=float(ratio.mean()),
                eq_ratio_se=float(ratio.std() / math.sqrt(n)),
            )
        else:
            from fewstep.sampling.samplers import sample_flowmap

            with torch.no_grad():
                x = sample_flowmap(student, x1, int(k)).x
            lp = teacher.log_prob(x, 0.0).to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"student samples at {k} NFE contain NaN or inf")
        m.update(mmd2=mmd2(x, ref), loglik=float(lp.mean()), loglik_se=float(lp.std() / math.sqrt(n)))
        if d <= knn_max_dim:
            m.update(density_free(x, teacher, ref))
        out[int(k)] = m
    return out


def heldout_fm_loss(student: Any, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    r"""Per-pair FM-on-pairs loss :math:`\frac1d\|v_\theta(x_t, t) - (x_1 - x_0)\|^2`, :math:`x_t=(1-t)x_0+t x_1`.

    Args:
        student: Velocity flow map (``velocity(x, t)``).
        x1: Held-out pair noise, shape (n, d).
        x0: The teacher's ODE endpoints of ``x1``.
        t: Fixed times, shape (n,).

    Returns:
        Per-pair losses, shape (n,) (the training loss is their mean).
    """
    student = student.double()
    x1, x0, t = x1.double(), x0.double(), t.double()
    with torch.no_grad():
        v = student.velocity(LinearPath().interpolate(x0, x1, t), t)
    return ((v - (x1 - x0)) ** 2).mean(dim=1)


def arm_config(method: str, overrides: list[str], pair_dir: Path) -> Any:
    """The config of one MA-experiment arm: :data:`BASE_CONFIG` with ``overrides`` and the shared pair cache."""
    root = Path(__file__).resolve().parents[3]
    base = Path(BASE_CONFIG[method])
    base = base if base.is_file() else root / base
    pairs = [f"method.cfg.pair_dir={pair_dir}"] if method in PAIR_METHODS else []
    return load_config(base, [*overrides, *pairs, "train.progress=false", "train.tensorboard=false"])


def load_student(run: dict[str, Any]) -> Any:
    """Rebuild a cached student from its run record (``cli`` overrides) and ``student_file``; returns (student in
    eval mode, the teacher it was trained against)."""
    from fewstep.config.build import build_student, build_teacher
    from fewstep.methods import get_method
    from fewstep.teachers.presets import load_preset

    words = run["cli"].split(" --run-dir")[0].split()[4:]
    cfg = arm_config("reflow" if "reflow" in run["cli"].split()[3] else "perflow", words, Path("/nonexistent"))
    # a learned teacher's run folder (``ma_experiments sweep --teacher-run``) or a preset / mixture JSON
    if cfg.teacher.kind == "run":
        teacher = build_teacher(cfg.teacher)
    else:
        teacher = load_preset(cfg.teacher.path or cfg.teacher.name)
    st = build_student(cfg.student, get_method(cfg.method.name), tuple(teacher.event_shape), None)
    st.load_state_dict(torch.load(run["student_file"], weights_only=True)["state"])
    return st.eval(), teacher


def mode_table(runs: dict[str, dict[str, Any]], nfe: int = 4, n: int = 2000) -> list[str]:
    """Mode coverage of the cached students of a sweep (:func:`fewstep.evaluation.metrics.mode_coverage`): per arm,
    the share of mixture components covered and the off-mode share of ``n`` samples at ``nfe`` uniform jumps (the
    noise of :func:`evaluate_student`, seeded by the run's seed); markdown rows, mean and range over seeds.

    Args:
        runs: ``runs`` of a sweep JSON (keys ``target/method/arm/seed``); runs without a cached student are skipped.
        nfe: Jump count.
        n: Samples per student.

    Returns:
        Markdown table lines.
    """
    from fewstep.evaluation.metrics import mode_coverage
    from fewstep.sampling.samplers import sample_flowmap

    arms: dict[str, list[tuple[float, float]]] = {}
    for key, run in runs.items():
        if not Path(run.get("student_file", "")).is_file():
            continue
        student, teacher = load_student(run)
        gen = torch.Generator().manual_seed(int(key.rsplit("/", 1)[1]))
        with torch.no_grad():
            x = sample_flowmap(student.double(), torch.randn(n, teacher.dim, generator=gen, dtype=torch.float64), nfe).x
        cov = mode_coverage(x, teacher)
        arms.setdefault(key.rsplit("/", 1)[0], []).append((float(cov["modes_covered"]), float(cov["off_mode"])))
    lines = [f"| target/method/arm | students | modes covered ({nfe} NFE): mean [min, max] | off-mode share: mean "
             "[min, max] |", "|---|---|---|---|"]
    for arm, v in arms.items():
        c, o = zip(*v, strict=True)
        lines.append(f"| {arm} | {len(v)} | {sum(c) / len(c):.2f} [{min(c):.2f}, {max(c):.2f}] | "
                     f"{sum(o) / len(o):.3f} [{min(o):.3f}, {max(o):.3f}] |")
    return lines
