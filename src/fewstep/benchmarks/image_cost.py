r"""Training cost of image run configs: CPU time per step, steps/s and peak memory, each config in a fresh process.

On a shared CPU the wall time of a step depends on the other processes' load; the **CPU time** of the process
(``time.process_time``, user + system, one torch thread) is what the step itself costs and is the number to
compare across methods. The cost relative to flow matching is :math:`\mathrm{CPU}_m / \mathrm{CPU}_{FM}` with the
flow-matching config (``method.name: flow_matching``) on the same backbone.

Peak memory is the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux)
after the timed steps, and its increase over the resident size just before the first step (``/proc/self/statm``):
the first includes Python, torch and the frozen teacher, the second is what training adds (activations, optimiser
state, fake-score networks). torch.cuda memory counters do not apply on CPU; tracemalloc misses torch's allocator.

Work done once in ``prepare()`` (cached teacher pairs) is shrunk (:data:`PREPARE_SHRINK`): it does not change the
cost of a step. ``python -m fewstep.benchmarks.image_cost configs/images/*.yaml --steps 3 --out FILE.md``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PREPARE_SHRINK", "measure", "measure_isolated", "markdown", "main"]

#: Overrides that shrink work done once in prepare() (pair caches) without changing a training step.
PREPARE_SHRINK = {"reflow": ["method.cfg.n_pairs=128"], "dmd": ["method.cfg.num_pairs=128"]}


def _rss_kib() -> float:
    """Current resident set size of this process in KiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024


def measure(config: str | Path, overrides: Sequence[str] = (), steps: int = 3) -> dict[str, Any]:
    """Cost of ``steps`` training iterations of a config in this process, after one warm-up iteration.

    Args:
        config: Run config YAML.
        overrides: Extra ``section.key=value`` overrides.
        steps: Timed iterations (medians over them).

    Returns:
        Method name, batch, median wall and CPU seconds per step, steps/s (1 / median wall), peak RSS (MiB) and
        its increase over the RSS before the first step (MiB).
    """
    import torch

    from fewstep.config.build import build_run
    from fewstep.config.schema import load_config

    torch.set_num_threads(1)
    cfg = load_config(config, list(overrides))
    cfg = load_config(config, [*PREPARE_SHRINK.get(cfg.method.name, []), *overrides])
    trainer = build_run(cfg, device="cpu", run_dir=None, with_eval=False)
    trainer.prepare()
    rss0 = _rss_kib()
    wall, cpu = [], []
    for k in range(steps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(k)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w, c = statistics.median(wall[1:]), statistics.median(cpu[1:])
    added = max(0.0, peak - rss0) / 1024  # ru_maxrss is sampled by the kernel: can read just below the statm RSS
    return {"config": str(config), "method": cfg.method.name, "batch": cfg.train.batch_size, "wall_s": w,
            "cpu_s": c, "steps_per_s": 1.0 / w, "peak_rss_mib": peak / 1024, "train_rss_mib": added}


def measure_isolated(config: str | Path, overrides: Sequence[str] = (), steps: int = 3) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (so the peak RSS is this config's alone)."""
    cmd = [sys.executable, "-m", "fewstep.benchmarks.image_cost", "--one", str(config), "--steps", str(steps),
           "--set", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]]) -> str:
    """Rows as a table with each method's CPU time per step relative to the flow-matching row (if any)."""
    fm = next((r["cpu_s"] for r in rows if r["method"] == "flow_matching"), None)
    lines = ["| method | config | batch | CPU s / step | x FM | wall s / step | steps/s (wall) | peak RSS MiB | "
             "training adds MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['cpu_s'] / fm:.2f}" if fm else "-"
        lines.append(f"| {r['method']} | {Path(r['config']).name} | {r['batch']} | {r['cpu_s']:.3f} | {rel} | "
                     f"{r['wall_s']:.3f} | {r['steps_per_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['train_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measure every config in its own process, write FILE.md and FILE.json."""
    p = argparse.ArgumentParser(prog="python -m fewstep.benchmarks.image_cost")
    p.add_argument("configs", nargs="*")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every config")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one, a.set, a.steps)))
        return 0
    if not a.configs or not a.out:
        p.error("give configs and --out")
    rows = []
    for c in a.configs:
        rows.append(measure_isolated(c, a.set, a.steps))
        print(json.dumps(rows[-1]), flush=True)
    text = markdown(rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
