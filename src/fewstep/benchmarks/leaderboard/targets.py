r"""Leaderboard targets and their bars: the analytic teacher of each target and its own Euler sampler.

A target is any name :func:`fewstep.teachers.presets.load_preset` resolves (``ring8``, ``aniso3``, ``digits`` the
64-D digits mixture, ``random:<seed>``); ``random`` expands to the suite ``random:0`` .. ``random:<n-1>``
(:func:`fewstep.teachers.random_mixtures.random_mixture_suite`); or a learned teacher on real data
(``learned-digits``, ``learned:<config.yaml>``: :mod:`~fewstep.benchmarks.leaderboard.learned`), whose reference
is the held-out real test split instead of exact mixture samples, and whose record adds the floors
(:func:`learned_floor`).

Quality is the unbiased summed-bandwidth RBF MMD² (:func:`fewstep.evaluation.metrics.mmd2`) of ``n`` samples from
the evaluation noise of a seed (:func:`fewstep.evaluation.evaluate.noise`) against ``n`` exact mixture samples
(:func:`fewstep.evaluation.evaluate.reference_samples`), plus the Fréchet distance in the digit-classifier features
(``fd``) on the 64-D digits targets. The bar of a student at K NFE is the (exact or learned) teacher's Euler sampler at
:math:`m K` steps, :math:`m \in \{4, 8, 16\}`, on the same noise and reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.leaderboard.learned import (
    LEARNED_ALIASES,
    is_learned_target,
    load_learned_teacher,
    real_reference,
    teacher_config,
    teacher_dir,
)
from fewstep.evaluation.evaluate import noise, reference_samples
from fewstep.evaluation.metrics import mmd2
from fewstep.sampling.samplers import solve, solve_adaptive, time_grid
from fewstep.teachers.presets import load_preset
from fewstep.teachers.random_mixtures import RANDOM_PREFIX, random_mixture_suite

__all__ = [
    "bar_file",
    "STUDENT_NFE",
    "BAR_MULTIPLES",
    "EULER_NFE",
    "expand_targets",
    "check_target",
    "load_target",
    "target_reference",
    "learned_floor",
    "sample_metrics",
    "teacher_curve",
    "is_random_target",
]

STUDENT_NFE: tuple[int, ...] = (1, 2, 4)
BAR_MULTIPLES: tuple[int, ...] = (4, 8, 16)
#: Teacher Euler step counts: the bars 4K, 8K, 16K of every student NFE K, and the curve of the figure.
EULER_NFE: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def expand_targets(names: list[str], random_n: int = 10, random_base: int = 0) -> list[str]:
    """Expand ``random`` into the random-mixture suite and check every name (one clear error for a bad one).

    Args:
        names: Target names (presets, ``random:<seed>``, ``random``, mixture JSON files).
        random_n: Size of the suite that ``random`` stands for.
        random_base: First seed of that suite.

    Returns:
        The names in order, duplicates removed.

    Raises:
        ValueError: for a name no loader accepts.
    """
    out: list[str] = []
    for name in names:
        items = list(random_mixture_suite(random_n, random_base)) if name == "random" else [name]
        for item in items:
            if item not in out:
                check_target(item)  # fail early, with the loader's message
                out.append(item)
    if not out:
        raise ValueError("no targets given")
    return out


def is_random_target(name: str) -> bool:
    """Whether a target is one of the seeded random mixtures."""
    return name.startswith(RANDOM_PREFIX)


def check_target(name: str) -> None:
    """Raise one clear ValueError for a bad target name (a learned target's config is read, not trained)."""
    if is_learned_target(name):
        teacher_config(name)
    else:
        load_target(name)


def load_target(name: str) -> Any:
    """The (unconditional) teacher of a target: the analytic mixture, or the learned one (trained if not cached)."""
    if is_learned_target(name):
        return load_learned_teacher(name)
    try:
        return load_preset(name)
    except ValueError as e:
        raise ValueError(
            f"unknown leaderboard target {name!r}: {e} (learned teachers: {', '.join(LEARNED_ALIASES)}, "
            "learned:<config.yaml>)"
        ) from None


def target_reference(name: str, teacher: Any, n: int, seed: int) -> torch.Tensor:
    """Reference samples of a target: ``n`` exact mixture samples, or every held-out real digit (learned)."""
    return real_reference(name) if is_learned_target(name) else reference_samples(teacher, n, seed)


def sample_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """``mmd2`` of samples ``x`` against ``ref``, and ``fd`` (digit-feature Fréchet distance) in 64-D."""
    x = x.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        return {"mmd2": float("nan")}
    out = {"mmd2": mmd2(x, ref)}
    if ref[0].numel() == 64:
        from fewstep.evaluation.digit_features import frechet_digits

        out["fd"] = frechet_digits(x, ref)
    return out


def bar_file(cache_dir: str | Path, name: str, seed: int) -> Path:
    """The cached Euler curve of target ``name`` at ``seed``: ``<cache_dir>/<name>__s<seed>.json``.

    In the name ``:`` becomes ``-`` and ``/`` becomes ``_`` (as in the cell paths).
    """
    return Path(cache_dir) / f"{name.replace(':', '-').replace('/', '_')}__s{seed}.json"


def learned_floor(name: str, teacher: Any, x1: torch.Tensor, ref: torch.Tensor, seed: int) -> dict[str, Any]:
    """Floors of a learned target: the teacher's accurate ODE (dopri5, rtol = atol = 1e-5) and real train digits.

    Args:
        name: Learned target name.
        teacher: Its teacher.
        x1: The evaluation noise.
        ref: The held-out real digits.
        seed: Seed of the train-digit draw (``len(x1)`` digits without replacement, or all when fewer).

    Returns:
        ``{"teacher_ode": metrics + nfe, "real_train": metrics}`` against ``ref``.
    """
    with torch.no_grad():
        res = solve_adaptive(teacher, x1, rtol=1e-5, atol=1e-5)
    train = real_reference(name, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(x1)]
    ode = {**sample_metrics(res.x, ref), "nfe": res.nfe}
    return {"teacher_ode": ode, "real_train": sample_metrics(train[idx], ref)}


def teacher_curve(name: str, seed: int, n: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """The teacher's Euler sampler at every :data:`EULER_NFE` step count on target ``name``, seed ``seed``.

    Args:
        name: Target name.
        seed: Evaluation seed (noise and reference samples).
        n: Number of samples.
        cache_dir: Folder for the cached result (``<name>__s<seed>.json``); None = no cache.

    Returns:
        ``{"target", "seed", "n", "dim", "euler": {steps: metrics}, "time_s"}`` with metrics from
        :func:`sample_metrics`; a learned target adds ``teacher`` (its run folder) , ``reference`` and
        ``floor`` (:func:`learned_floor`).
    """
    path = None if cache_dir is None else bar_file(cache_dir, name, seed)
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    teacher = load_target(name)
    learned = is_learned_target(name)
    x1 = noise(n, teacher, seed)
    x1 = x1.to(next(teacher.parameters()).dtype) if learned else x1
    ref = target_reference(name, teacher, n, seed)
    euler = {}
    for k in EULER_NFE:
        with torch.no_grad():
            x = solve(teacher, x1, time_grid(k), method="euler").x
        euler[str(k)] = sample_metrics(x, ref)  # outside no_grad: the digit features may fit a net
    dim = int(x1[0].numel())
    rec: dict[str, Any] = {"target": name, "seed": seed, "n": n, "dim": dim, "euler": euler}
    if learned:
        rec.update(
            components=None,
            teacher=str(teacher_dir(name)),
            reference=f"{len(ref)} held-out real digits (test split)",
            floor=learned_floor(name, teacher, x1, ref, seed),
        )
    else:
        rec["components"] = int(teacher.weights.shape[0])
    rec["time_s"] = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(path)
    return rec
