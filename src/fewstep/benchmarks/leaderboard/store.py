r"""The tracked cell store: one small metrics JSON per finished cell, committed, so results survive a machine change.

Layout of ``<cells_dir>/<budget tag>/`` (``cells_dir`` = ``docs/leaderboard_cells`` for the full leaderboard):
``<target>/<method>/seed<k>.json`` (one cell's metrics record, no weights; ``:`` in a target name becomes ``-``)
and ``_bars/<target>__s<seed>.json`` (the teacher's Euler curve). A record is *complete* when it finished
(``status`` ok) and every student NFE has a valid metric; complete and failed records are cached, anything else
(missing, unreadable, or with stale NFE entries) is run again.

Evaluation versions (``eval_version`` in a record; absent = 1):

1. before :data:`fewstep.sampling.spec.RENOISE_SEED_OFFSET`: the re-noising draws of stochastic (gamma > 0)
   samplers came from a generator seeded like the initial noise, so the first "fresh" noise was x_1 itself. Only
   the multi-step (K > 1) metrics of gamma > 0 samplers are affected; the 1-NFE sample and the training are not.
2. re-noising drawn from ``seed + RENOISE_SEED_OFFSET`` (current).

:func:`import_leaderboard_json` turns the rows of a leaderboard JSON written before this store (one seed per row)
into records of version 1, keeping only the entries that version 2 would reproduce.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from fewstep.benchmarks.leaderboard.targets import STUDENT_NFE
from fewstep.methods.registry import METHODS

__all__ = [
    "EVAL_VERSION",
    "budget_root",
    "cell_path",
    "bars_dir",
    "read_json",
    "write_json",
    "stale_nfe",
    "is_complete",
    "host_label",
    "import_leaderboard_json",
]

#: Version of the evaluation a newly computed record follows (see the module docstring).
EVAL_VERSION = 2


def budget_root(cells_dir: str | Path, tag: str) -> Path:
    """``<cells_dir>/<budget tag>``: every cell of one budget."""
    return Path(cells_dir) / tag


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "_")


def cell_path(root: Path, method: str, target: str, seed: int) -> Path:
    """Record file of one cell under a budget folder: ``<target>/<method>/seed<k>.json``."""
    return Path(root) / _safe(target) / method / f"seed{seed}.json"


def bars_dir(root: Path) -> Path:
    """Folder of the teacher Euler curves of a budget folder."""
    return Path(root) / "_bars"


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is missing or unreadable (a cell cut off mid-write is redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    tmp.replace(path)


def _gamma(sampler: str) -> float | None:
    """The gamma of a sampler description (``SamplerSpec.describe``), or None when it names none."""
    m = re.search(r"gamma=([0-9.eE+-]+)", sampler or "")
    return float(m.group(1)) if m else None


def stale_nfe(rec: dict[str, Any]) -> dict[str, str]:
    """NFE entries of a record that the current evaluation would not reproduce, with the reason.

    Args:
        rec: A cell record.

    Returns:
        ``{nfe: reason}``; empty for a current record.
    """
    out: dict[str, str] = {}
    gamma = _gamma(rec.get("sampler", ""))
    if int(rec.get("eval_version", 1)) < 2 and gamma is not None and gamma > 0:
        for k in STUDENT_NFE:
            if k > 1:
                out[str(k)] = "gamma > 0 re-noising drawn before the re-noise seed fix (eval_version 1)"
    cls = METHODS.get(str(rec.get("method")))
    if cls is not None and cls.needs_init and "init" not in rec:
        for k in STUDENT_NFE:
            out[str(k)] = f"trained from random weights, before the {cls.needs_init} init this method now starts from"
    return out


def is_complete(rec: dict[str, Any] | None) -> bool:
    """Whether a record is a finished cell with a valid metric at every student NFE."""
    if not rec or rec.get("status") != "ok":
        return False
    stale = stale_nfe(rec)
    return all(str(k) in (rec.get("final") or {}) and str(k) not in stale for k in STUDENT_NFE)


def host_label() -> str:
    """``<node> (<cpu model>)``: timings (ms/step, × FM) are compared only between cells of one host."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()} ({cpu})"


def import_leaderboard_json(
    path: str | Path, cells_dir: str | Path, source: str, eval_version: int = 1
) -> dict[str, int]:
    """Write the rows of an earlier leaderboard JSON as records (existing records are never overwritten).

    Only one-seed rows are imported (a row's mean over several seeds is not a cell). Metrics the current evaluation
    would not reproduce (:func:`stale_nfe`) are dropped from ``final``; the record keeps them under ``stale``, so
    the runner recomputes the cell while the report still uses its valid entries. Timings, evaluation counts and
    times to the bar of the old rows were aggregated per method, so the records carry only ``step_s``.

    Args:
        path: The leaderboard JSON (``rows``, ``budget``, ``commands``, ``methods_summary``).
        cells_dir: The store (records go under ``<cells_dir>/<budget tag>``).
        source: Provenance written into every record (e.g. the file and commit it was taken from).
        eval_version: Evaluation version the rows were computed with.

    Returns:
        Counts: ``imported``, ``kept`` (a record existed), ``skipped`` (several seeds), ``partial`` (stale entries).
    """
    from fewstep.benchmarks.leaderboard.cell_setup import Budget

    d = json.loads(Path(path).read_text())
    budget = Budget(**d["budget"])
    root = budget_root(cells_dir, budget.tag())
    command = " ; ".join(d.get("commands", []))
    counts = {"imported": 0, "kept": 0, "skipped": 0, "partial": 0}
    for row in d["rows"]:
        if len(row["seeds"]) != 1:
            counts["skipped"] += 1
            continue
        method, target, seed = row["method"], row["target"], row["seeds"][0]
        out = cell_path(root, method, target, seed)
        if out.exists():
            counts["kept"] += 1
            continue
        summary = d.get("methods_summary", {}).get(method, {})
        final = {k: {m: v for m, v in e.items() if m in ("mmd2", "fd")} for k, e in row["nfe"].items()}
        rec: dict[str, Any] = {
            "method": method,
            "target": target,
            "seed": seed,
            "budget": budget.to_dict(),
            "config": summary.get("config", "?"),
            "design_limits": row.get("design_limits", {}),
            "sampler": row["sampler"],
            "status": "ok",
            "step_s": row.get("step_s"),
            "eval_version": eval_version,
            "imported_from": source,
            "command": command,
            "host": f"unknown (imported: {source})",
        }
        stale = stale_nfe({**rec, "final": final})
        rec["final"] = {k: v for k, v in final.items() if k not in stale}
        if stale:
            rec["stale"] = {k: {**final[k], "reason": r} for k, r in stale.items() if k in final}
            counts["partial"] += 1
        write_json(out, rec)
        counts["imported"] += 1
    return counts
