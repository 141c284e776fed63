r"""MA sweeps with a learned teacher: a ``fewstep train-teacher`` run folder on real data (issue 14, item 3).

``python -m fewstep.benchmarks.ma_experiments sweep --teacher-run <run folder>`` runs the arms of
:mod:`fewstep.benchmarks.ma_experiments` on the target ``run:<run folder>``: every arm is ``configs/reflow_ma.yaml``
with ``teacher.kind=run`` (:func:`fewstep.config.build.build_teacher`: the run's EMA velocity network wrapped by
:meth:`~fewstep.teachers.module.ModuleTeacher.from_flowmap`) and the run's own data section (event shape only: reflow
trains on teacher pairs). MA scores the window end with the score converted from the learned velocity
(:func:`fewstep.methods._shared.alignment.end_score`, :math:`s = -(x + (1 - t) v)/t` at :math:`t = \varepsilon`),
as for an analytic teacher; there is no analytic shortcut.

Metrics per NFE (uniform jumps from N(0, I) noise), as on the leaderboard's ``learned-digits`` target:

* ``mmd2``: MMD² (:func:`fewstep.evaluation.metrics.mmd2`) against the held-out real data (the test split of the run's
  data section, never trained on by the teacher);
* ``fd``: Fréchet distance in the digit classifier's features (:func:`fewstep.evaluation.digit_features.
  frechet_digits`; 64-D digits only) against the same held-out digits;
* ``mmd2_teacher``: MMD² against the teacher's own marginal (the RK4-64 endpoints of the held-out pairs), the
  distribution a distilled student targets.

No KL, TV or log p₀: they need the target density, which a learned velocity teacher does not have in closed form
(its ODE likelihood is itself an estimate), and in 64-D the student's change-of-variables density is not measured.
:func:`floors` records the teacher's own numbers (ODE and Euler samplers) and real-vs-real values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.ma_report import arm_groups, ci_cell, compare, tally, write_report
from fewstep.benchmarks.ma_stats import metric

__all__ = [
    "RUN_PREFIX",
    "METRICS",
    "is_run_target",
    "run_folder",
    "run_target",
    "target_tag",
    "run_overrides",
    "load_target",
    "real_reference",
    "learned_refs",
    "sample_metrics",
    "evaluate_learned",
    "floors",
    "spread_table",
    "render_learned",
    "is_learned_sweep",
    "write_learned_report",
]

RUN_PREFIX = "run:"
#: Per-NFE metrics of a learned-teacher student (all lower is better).
METRICS = ("mmd2", "fd", "mmd2_teacher")


def is_run_target(spec: str) -> bool:
    """Whether a sweep target names a teacher run folder (``run:<folder>``) rather than a preset."""
    return spec.startswith(RUN_PREFIX)


def run_folder(spec: str) -> Path:
    """The run folder of a ``run:<folder>`` target."""
    return Path(spec[len(RUN_PREFIX) :])


def target_tag(spec: str) -> str:
    """The key of a target in the sweep JSON: ``learned-<folder name>`` for a run, the file stem for a preset."""
    return f"learned-{run_folder(spec).name}" if is_run_target(spec) else Path(spec).stem


def _data_section(folder: Path) -> tuple[str, dict[str, Any]]:
    """The teacher run's dataset name and kwargs (unconditional), checked to have a held-out test split."""
    from fewstep.config.run_folder import read_run_config

    cfg = read_run_config(folder)
    kw = {**dict(cfg.data.kwargs), "conditional": False}
    if cfg.data.name in ("teacher", "") or kw.get("split", "train") != "train":
        raise ValueError(f"teacher run {str(folder)!r}: needs a dataset trained on its 'train' split (held-out test "
                         f"split as reference), got data.name={cfg.data.name!r}, kwargs={dict(cfg.data.kwargs)}")
    return cfg.data.name, kw


def run_overrides(folder: str | Path) -> list[str]:
    """``teacher.*`` and ``data.*`` overrides that make a run config distil the teacher of run folder ``folder``."""
    name, kw = _data_section(Path(folder))
    data = [f"data.kwargs.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(kw.items())]
    return ["teacher.kind=run", f"teacher.path={folder}", "teacher.conditional=false", "teacher.guidance=1.0",
            f"data.name={name}", *data]


def run_target(folder: str) -> str:
    """The sweep's target name of a learned teacher run folder, checked (a bad folder exits with one line)."""
    try:
        run_overrides(folder)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--teacher-run: {e}") from None
    return RUN_PREFIX + folder


def load_target(spec: str) -> Any:
    """The teacher of a sweep target: a preset / mixture JSON, or the learned teacher of ``run:<folder>``."""
    if is_run_target(spec):
        from fewstep.config.build import build_teacher
        from fewstep.config.schema import TeacherConfig

        return build_teacher(TeacherConfig(kind="run", path=str(run_folder(spec))))
    from fewstep.teachers.presets import load_preset

    return load_preset(spec)


def real_reference(folder: str | Path, split: str = "test") -> torch.Tensor:
    """Real rows of the teacher run's dataset, float64, flattened: ``test`` is held out from its training."""
    from fewstep.data.datasets import get_dataset

    name, kw = _data_section(Path(folder))
    x = get_dataset(name, **{**kw, "split": split}).tensors()[0]
    return x.reshape(len(x), -1).to(torch.float64)


def learned_refs(spec: str, held: tuple[torch.Tensor, ...], n: int) -> dict[str, torch.Tensor]:
    """References of a learned target: held-out real rows, and ``n`` teacher samples (held-out pair endpoints)."""
    return {"real": real_reference(run_folder(spec)), "teacher": held[1][:n].double()}


def sample_metrics(x: torch.Tensor, refs: dict[str, torch.Tensor]) -> dict[str, float]:
    """:data:`METRICS` of samples ``x`` (``fd`` only for 64-element rows)."""
    from fewstep.evaluation.metrics import mmd2

    x = x.detach().reshape(len(x), -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("student samples contain NaN or inf")
    out = {"mmd2": mmd2(x, refs["real"]), "mmd2_teacher": mmd2(x, refs["teacher"])}
    if x.shape[1] == 64:
        from fewstep.evaluation.digit_features import frechet_digits

        out["fd"] = frechet_digits(x.float(), refs["real"].float())
    return out


def evaluate_learned(student: Any, refs: dict[str, torch.Tensor], n: int = 2000, seed: int = 0,
                     nfe: tuple[int, ...] = (1, 2, 4)) -> dict[int, dict[str, float]]:
    """Per-NFE :func:`sample_metrics` of a flow-map student (float64; noise seeded by ``seed``).

    Args:
        student: Flow map (cast to float64 in place).
        refs: :func:`learned_refs`.
        n: Samples per NFE.
        seed: Seed of the noise.
        nfe: Jump counts.

    Returns:
        {k: metrics}.
    """
    from fewstep.sampling.samplers import sample_flowmap

    student = student.double()
    x1 = torch.randn(n, refs["real"].shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {}
    for k in nfe:
        with torch.no_grad():
            x = sample_flowmap(student, x1, int(k)).x
        out[int(k)] = sample_metrics(x, refs)
    return out


def floors(teacher: Any, refs: dict[str, torch.Tensor], spec: str, n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The teacher's own numbers: its RK4-64 ODE on fresh noise (the floor of a perfect student: ``mmd2_teacher`` is
    then teacher vs teacher), its Euler sampler at 1/2/4/8 steps, and ``n`` real train rows (real vs real), each
    against the references; float32 teacher, noise seeded by ``seed`` (independent of the held-out pairs)."""
    from fewstep.sampling.samplers import solve

    x1 = torch.randn(n, refs["real"].shape[1], generator=torch.Generator().manual_seed(seed))
    out: dict[str, Any] = {}
    for method, k in (("rk4", 64), ("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8)):
        with torch.no_grad():
            x = solve(teacher, x1, k, method=method).x
        out[f"teacher_{method}_{k}"] = sample_metrics(x, refs)  # outside no_grad: FD may fit its classifier
    train = real_reference(run_folder(spec), "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    out["real_train"] = sample_metrics(train[idx], refs)
    out["n_real_test"] = len(refs["real"])
    return out


def _spread(x: torch.Tensor) -> tuple[float, float]:
    """(total variance of the pixels, total variance of the digit-classifier features) of samples ``x``."""
    from fewstep.evaluation.digit_features import digit_feature_net

    net, _ = digit_feature_net()  # outside no_grad: may fit the classifier
    with torch.no_grad():
        return float(x.var(0).sum()), float(net.features(x.float()).var(0).sum())


def spread_table(runs: dict[str, dict[str, Any]], nfe: int = 4, n: int = 2000) -> list[str]:
    """Sample spread of the cached students of a learned-teacher sweep against the real test digits and the
    teacher's RK4-64 samples: total variance in pixels and in the classifier's features (a reverse KL is
    mode-seeking: a student that contracts toward high-density regions has a smaller spread). Markdown rows, mean
    and [min, max] over seeds; ``n`` samples at ``nfe`` uniform jumps from the noise of :func:`evaluate_learned`.

    Args:
        runs: ``runs`` of a learned sweep JSON; runs without a cached student file are skipped.
        nfe: Jump count.
        n: Samples per student.

    Returns:
        Markdown table lines.
    """
    from fewstep.benchmarks.ma_eval import load_student
    from fewstep.sampling.samplers import sample_flowmap, solve

    rows: dict[str, list[tuple[float, float]]] = {}
    teacher, folder = None, ""
    for key, run in runs.items():
        if not Path(run.get("student_file", "")).is_file():
            continue
        st, teacher = load_student(run)
        folder = next(w.split("=", 1)[1] for w in run["cli"].split() if w.startswith("teacher.path="))
        shape = tuple(teacher.event_shape)
        x1 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(int(key.rsplit("/", 1)[1])),
                         dtype=torch.float64)
        with torch.no_grad():
            x = sample_flowmap(st.double(), x1, nfe).x
        rows.setdefault(key.rsplit("/", 1)[0], []).append(_spread(x))
    if teacher is None:
        return ["no cached students"]
    with torch.no_grad():
        xt = solve(teacher, torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)), 64, method="rk4").x
    lines = [f"| samples | students | pixel variance ({nfe} NFE): mean [min, max] | feature variance: mean "
             "[min, max] |", "|---|---|---|---|"]
    for name, x in (("real test digits", real_reference(folder)), ("teacher RK4-64", xt.double())):
        p, f = _spread(x)
        lines.append(f"| {name} | – | {p:.2f} | {f:.2f} |")
    for arm, v in rows.items():
        p, f = zip(*v, strict=True)
        lines.append(f"| {arm} | {len(v)} | {sum(p) / len(p):.2f} [{min(p):.2f}, {max(p):.2f}] | "
                     f"{sum(f) / len(f):.2f} [{min(f):.2f}, {max(f):.2f}] |")
    return lines


def render_learned(res: dict[str, Any], with_claim_i: bool = False) -> tuple[str, dict[str, Any]]:
    """Markdown of a learned-teacher sweep: floors, per-arm metrics, seed-paired MA-vs-baseline comparisons, tally.

    Args:
        res: The merged sweep JSON.
        with_claim_i: Unused (claim (i) re-measures with the analytic teacher's metrics; not run here).

    Returns:
        (markdown, summary records).
    """
    groups = arm_groups(res)
    lines = ["# MA with a learned teacher: tables (generated)", "",
             "Generated by `python -m fewstep.benchmarks.ma_experiments report ...` from the sweep JSON; settings: "
             f"`{json.dumps(res['settings'], ensure_ascii=False)}`; cost ratios r (CPU time of an MA step / plain "
             f"step): `{json.dumps(res.get('ratio', {}))}`.", "",
             "Metrics (`fewstep.benchmarks.ma_teacher_run`): `mmd2` and `fd` (digit-classifier Fréchet distance) "
             "against the held-out real digits, `mmd2_teacher` against the teacher's RK4-64 samples. No KL/TV: the "
             "learned teacher has no density. Intervals are 95 % t-intervals over seeds; comparisons are seed-paired "
             "differences MA − baseline (relative to the baseline mean), `tie` when the interval contains 0.", ""]
    summary: dict[str, Any] = {"compare": []}
    for tag in dict.fromkeys(t for t, _, _ in groups):
        fl = res.get("floor", {}).get(tag, {})
        lines += [f"## {tag}", "", "### Floors (the teacher and real data, one draw)", "",
                  "| sampler | MMD² (real) | FD (real) | MMD² (teacher) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['mmd2']:.4g} | {v.get('fd', float('nan')):.3g} | {v['mmd2_teacher']:.4g} |"
                  for k, v in fl.items() if isinstance(v, dict)]
        lines += ["", f"Held-out real digits: {fl.get('n_real_test', '?')}.", "", "### Arms", "",
                  "| arm | steps | CPU ms/step | NFE | MMD² (real) | FD (real) | MMD² (teacher) | held-out FM loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for (t, _, arm), runs in groups.items():
            if t != tag:
                continue
            steps = next(iter(runs.values()))["steps"]
            ms = ci_cell([1e3 * r["cpu_s_per_step"] for r in runs.values()])
            for k in (1, 2, 4):
                cols = [ci_cell([v for r in runs.values() if (v := metric(r, m, k)) is not None]) for m in METRICS]
                fm = ci_cell([r["fm_loss"] for r in runs.values()], ".4g") if k == 1 else ""
                lines.append(f"| {arm} ({len(runs)} seeds) | {steps} | {ms if k == 1 else ''} | {k} | "
                             + " | ".join(cols) + f" | {fm} |")
        cl, recs = compare(groups, tag, metrics=METRICS)
        summary["compare"] += recs
        lines += ["", "### MA vs baselines", "", *cl, ""]
    lines += ["## Tally", "", *tally(summary["compare"]), ""]
    return "\n".join(lines) + "\n", summary


def is_learned_sweep(files: list[Path]) -> bool:
    """Whether the sweep JSON files hold a learned-teacher sweep (``settings.teacher_run``)."""
    return any(json.loads(Path(f).read_text()).get("settings", {}).get("teacher_run") for f in files)


def write_learned_report(files: list[Path], out: Path) -> None:
    """:func:`fewstep.benchmarks.ma_report.write_report` with :func:`render_learned`; floors are merged too."""
    write_report(files, out, renderer=render_learned)
