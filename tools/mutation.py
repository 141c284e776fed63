"""Mutation testing of fewstep's maths modules with mutmut, one module at a time, each with its own fast tests.

mutmut (pinned 3.8.1) rewrites every function of a module into mutants (flipped operators, changed constants,
dropped arguments, ...) and runs the tests that reach the function; a mutant no test fails on "survives". Each
module runs in its own scratch copy of the repository (``--workdir``, default /tmp/fewstep_mutation/<module>), so the
shared working tree is never mutated, with the test files listed in ``MODULES`` only (mutmut then picks, per
mutant, the tests that called the mutated function). The score is killed / (mutants - equivalent), where
``EQUIVALENT`` lists the surviving mutants argued equivalent (by mutmut's mutant name, with a one-line reason, also
in docs/mutation.md); both tables are in tools/mutation_config.py.

Usage::

    python tools/mutation.py core/paths.py core/flowmap.py      # some modules
    python tools/mutation.py --all                                 # every module in MODULES (hours on 2 cores)
    python tools/mutation.py --list                                # modules and their test files
    python tools/mutation.py --record 2026-12-07 core/paths.py     # last scratch summary -> docs/results/*.json

Writes ``<workdir>/<module>/summary.json`` (per-mutant status) and prints the survivors and the score.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_config import EQUIVALENT, MODULES  # noqa: E402  (tools/mutation_config.py, beside this file)

ROOT = Path(__file__).resolve().parents[1]

_KILLED = ("killed", "timeout", "segfault", "caught by type check")


def _pyproject(module: str, tests: list[str]) -> str:
    """The scratch copy's pyproject.toml: the repo's pytest options plus a [tool.mutmut] section for ``module``."""
    sel = ", ".join(json.dumps(f"tests/{t}") for t in tests)
    return f"""[tool.pytest.ini_options]
pythonpath = ["tests"]
addopts = "-m 'not slow' -p no:cacheprovider -x -q"
markers = ["slow: long-running tests", "peers: needs the peers extra"]
filterwarnings = ["ignore::DeprecationWarning", "ignore::UserWarning"]

[tool.mutmut]
source_paths = ["src/"]
only_mutate = ["src/fewstep/{module}"]
pytest_add_cli_args_test_selection = [{sel}]
use_git_change_detection = false
timeout_multiplier = 5.0
"""


def scratch_dir(module: str, workdir: Path) -> Path:
    """The scratch copy of one module's run: ``<workdir>/<module path with / as _, no .py>``."""
    return workdir / module.replace("/", "_").removesuffix(".py")


def prepare(module: str, workdir: Path, fresh: bool = True) -> Path:
    """Copy src/ (when ``fresh``; the folder is wiped first) and the module's tests into ``workdir/<module>``."""
    tests = [t for t in MODULES[module] if (ROOT / "tests" / t.split("::")[0]).exists()]
    dest = scratch_dir(module, workdir)
    if fresh:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "tests").mkdir(parents=True, exist_ok=True)
    for helper in (ROOT / "tests").glob("_*.py"):
        shutil.copy2(helper, dest / "tests" / helper.name)
    for t in {t.split("::")[0] for t in tests}:
        (dest / "tests" / t).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "tests" / t, dest / "tests" / t)
    (dest / "pyproject.toml").write_text(_pyproject(module, tests))
    return dest


def _statuses(dest: Path) -> dict[str, str]:
    """Per-mutant status from ``mutmut results --all true`` (lines ``name: status``)."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=dest,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    res: dict[str, str] = {}
    for line in out.splitlines():
        if ":" in line and "__mutmut_" in line:
            name, status = line.strip().rsplit(":", 1)
            res[name.strip()] = status.strip()
    return res


def run(module: str, workdir: Path, max_children: int, survivors: bool = False) -> dict[str, object]:
    """Run mutmut on ``module``; returns counts, survivors and the score killed / (total - equivalent).

    With ``survivors`` (and an earlier run's summary.json in the scratch copy) only the tests are refreshed and
    only the earlier survivors rerun (the source must be unchanged since that run).
    """
    old = scratch_dir(module, workdir) / "summary.json"
    again = (  # every earlier non-killed mutant not (or no longer) listed as equivalent
        [n for n, s in json.loads(old.read_text())["status"].items() if s not in _KILLED and n not in EQUIVALENT]
        if survivors and old.exists()
        else []
    )
    rerun = survivors and old.exists()
    dest = prepare(module, workdir, fresh=not rerun)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    if again or not rerun:  # (a rerun with nothing left to rerun must not start a full run)
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *again],
            cwd=dest,
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
        )
    st = _statuses(dest)
    if rerun:  # mutmut resets the other results when tests change: keep the earlier run's verdicts for them
        prev = json.loads(old.read_text())["status"]
        st = {**prev, **{n: st[n] for n in again if n in st}}
    killed = [n for n, s in st.items() if s in _KILLED]
    survived = [n for n, s in st.items() if s not in _KILLED]
    equivalent = [n for n in survived if n in EQUIVALENT]
    live = [n for n in survived if n not in EQUIVALENT]
    denom = len(st) - len(equivalent)
    summary = {
        "module": module,
        "tests": MODULES[module],
        "mutants": len(st),
        "killed": len(killed),
        "equivalent": len(equivalent),
        "survived": live,
        "status": st,
        "score": len(killed) / denom if denom else float("nan"),
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"{module}: {len(killed)}/{denom} killed ({100 * summary['score']:.1f} %), {len(equivalent)} equivalent, "
        f"{len(live)} surviving: {', '.join(s + '=' + st[s] for s in live[:40])}",
        flush=True,
    )
    return summary


def record(module: str, workdir: Path, date: str, first_run: str = "") -> None:
    """Copy the scratch summary of ``module`` (no per-mutant statuses) to docs/results/mutation_survivors.json."""
    summary = json.loads((scratch_dir(module, workdir) / "summary.json").read_text())
    out = ROOT / "docs" / "results" / "mutation_survivors.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    entry = {k: summary[k] for k in ("tests", "mutants", "killed", "equivalent", "score", "survived")}
    entry["date"] = date
    if first_run:
        entry["first_run"] = first_run
    elif "first_run" in table.get(module, {}):
        entry["first_run"] = table[module]["first_run"]
    table[module] = entry
    out.write_text(json.dumps(dict(sorted(table.items())), indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"modules under src/fewstep, e.g. {next(iter(MODULES))}")
    p.add_argument("--all", action="store_true", help="every module in MODULES")
    p.add_argument("--list", action="store_true", help="print the modules and their test files")
    p.add_argument("--workdir", default="/tmp/fewstep_mutation")
    p.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (the CPU is shared: keep 1)")
    p.add_argument("--survivors", action="store_true", help="rerun only the last run's survivors with fresh tests")
    p.add_argument("--record", metavar="DATE", help="only copy the modules' last scratch summaries into "
                   "docs/results/mutation_survivors.json, dated DATE (no run)")
    p.add_argument("--first-run", default="", help="with --record: the first run's score, e.g. '92/129'")
    args = p.parse_args(argv)
    if args.list:
        for m, t in MODULES.items():
            print(f"{m}: {' '.join(t)}")
        return 0
    mods = list(MODULES) if args.all else args.modules
    bad = [m for m in mods if m not in MODULES]
    if bad or not mods:
        p.error(f"unknown module(s) {bad}; choose from {list(MODULES)}" if bad else "name a module or pass --all")
    for m in mods:
        if args.record:
            record(m, Path(args.workdir), args.record, args.first_run)
        else:
            run(m, Path(args.workdir), args.max_children, args.survivors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
