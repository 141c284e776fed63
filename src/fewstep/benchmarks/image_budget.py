r"""Image students at a longer training budget against the same methods at the table budget, paired by seed.

Input: the eval JSONs that ``python -m fewstep.benchmarks.image_bench students RUN --out F.md`` writes, named as
in ``docs/results/images_evals``: ``<method>.json`` (training seed 0), ``<method>-s1.json``, ``<method>-s2.json`` at
the table budget and ``<method><tag>.json``, ``<method><tag>-s1.json``, ... at the longer one (``tag`` e.g. ``-x4``).
For every method and NFE the table lists the FD per training seed at both budgets and the seed-paired difference
(longer minus table budget) with its 95 % t-interval (:func:`fewstep.benchmarks.ma_stats.paired`; ``tie`` when
the interval contains 0, no interval with one seed). ``--base-tag 600`` compares against ``<method>600*.json``
instead of the table budget. Optionally the wall time of each run, from the driver's log
lines ``HH:MM:SS DONE <run> train_s=<s> eval_s=<s>``.

``python -m fewstep.benchmarks.image_budget --dir docs/results/images_evals --tag=-x4 --methods reflow shortcut
--times docs/results/images_x4_times.log --out FILE.md``
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewstep.benchmarks.ma_stats import paired

__all__ = ["load_fd", "budget_rows", "wall_times", "markdown", "main"]


def _name(method: str, tag: str, seed: int) -> str:
    return f"{method}{tag}" + (f"-s{seed}" if seed else "")


def load_fd(directory: str | Path, method: str, tag: str, seeds: Sequence[int] = (0, 1, 2)
            ) -> tuple[dict[int, dict[int, float]], set[int]]:
    """FD as nfe -> seed -> value and the set of training steps, for the seeds whose JSON file exists."""
    fd: dict[int, dict[int, float]] = {}
    steps: set[int] = set()
    for s in seeds:
        f = Path(directory) / f"{_name(method, tag, s)}.json"
        if not f.exists():
            continue
        for r in json.loads(f.read_text()):
            fd.setdefault(int(r["nfe"]), {})[s] = float(r["fd"])
            steps.add(int(r.get("steps", 0)))
    return fd, steps


def budget_rows(directory: str | Path, methods: Sequence[str], tag: str, base_tag: str = ""
                ) -> list[dict[str, Any]]:
    """One row per method and NFE: per-seed FD at both budgets and the paired difference (longer - base)."""
    rows = []
    for m in methods:
        base, base_steps = load_fd(directory, m, base_tag)
        long, long_steps = load_fd(directory, m, tag)
        for nfe in sorted(long):
            d = paired(long[nfe], base.get(nfe, {}))
            rows.append({"method": m, "nfe": nfe, "steps": (sorted(base_steps), sorted(long_steps)),
                         "base": base.get(nfe, {}), "long": long[nfe], "diff": d})
    return rows


def wall_times(log: str | Path) -> list[tuple[str, int, int]]:
    """(run, train seconds, eval seconds) of every ``DONE`` line of a driver log."""
    pat = re.compile(r"DONE (\S+) train_s=(\d+) eval_s=(\d+)")
    return [(m[1], int(m[2]), int(m[3])) for m in map(pat.search, Path(log).read_text().splitlines()) if m]


def _seeds(v: dict[int, float]) -> str:
    return " / ".join(f"{v[s]:.2f}" for s in sorted(v)) if v else "-"


def markdown(rows: list[dict[str, Any]], times: Sequence[tuple[str, int, int]] = ()) -> str:
    """The paired table (and the wall-time table when ``times`` is given) as markdown."""
    lines = ["| method | NFE | train steps | FD per seed, base budget | FD per seed, longer | longer - base "
             "(paired, 95 % t) | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["diff"]
        ci = f"{d['diff']:+.2f} [{d['diff'] - d['hw']:+.2f}, {d['diff'] + d['hw']:+.2f}] (n {d['n']})" \
            if d["n"] > 1 and math.isfinite(d["hw"]) else (f"{d['diff']:+.2f} (n 1)" if d["n"] == 1 else "-")
        verdict = d["verdict"] if d["n"] > 1 else "-"
        st = f"{'/'.join(map(str, r['steps'][0]))} -> {'/'.join(map(str, r['steps'][1]))}"
        lines.append(f"| {r['method']} | {r['nfe']} | {st} | {_seeds(r['base'])} | {_seeds(r['long'])} | {ci} | "
                     f"{verdict} |")
    if times:
        lines += ["", "| run | train wall s | eval wall s |", "|---|---|---|"]
        lines += [f"| {n} | {a} | {b} |" for n, a, b in times]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the paired budget table to ``--out``."""
    p = argparse.ArgumentParser(prog="python -m fewstep.benchmarks.image_budget")
    p.add_argument("--dir", default="docs/results/images_evals")
    p.add_argument("--tag", required=True, help="run-name suffix of the longer budget; write --tag=-x4")
    p.add_argument("--base-tag", default="", help="run-name suffix of the base budget (default: the table's runs)")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--times", default=None, help="driver log with 'DONE <run> train_s=.. eval_s=..' lines")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    text = markdown(budget_rows(a.dir, a.methods, a.tag, a.base_tag), wall_times(a.times) if a.times else ())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
