"""Tables of :mod:`fewstep.benchmarks.method_bench`: markdown summary, output files and merging of run JSONs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["merge", "summarize", "write_outputs"]


def _fmt(vals: list[float]) -> str:
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def merge(paths: list[str], out: str) -> dict[str, Any]:
    """Combine the JSON files of several runs (same seeds, budget and presets) into one table at ``out``."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    for d in docs:  # each run keeps the flow-matching timing of its own process
        for r in d["runs"]:
            r.setdefault("fm_step_s", d["fm_step_s"][r["preset"]])
    res = docs[0]
    for d in docs[1:]:
        for key in ("seeds", "steps", "batch_size", "n_eval"):
            if d[key] != res[key]:
                raise ValueError(f"cannot merge {paths}: {key} differs ({res[key]} vs {d[key]})")
        res["commands"] += d["commands"]
        res["runs"] += d["runs"]
        for key in ("bars", "fm_step_s"):
            res[key] = {**d[key], **res[key]}
    write_outputs(res, Path(out))
    return res


def _get(d: dict[Any, Any], k: int) -> Any:
    """d[k] for int keys that a JSON round trip turned into strings."""
    return d[k] if k in d else d[str(k)]


def summarize(results: dict[str, Any]) -> str:
    """Markdown: the exact command lines, seeds and budget, then one row per (method, preset)."""
    cmds = "\n".join(f"    {c}" for c in results["commands"])
    lines = ["Commands:", "", cmds, "",
             f"Seeds {results['seeds']}; budget {results['steps']} steps × batch {results['batch_size']} (Adam, "
             "lr per row, EMA student, fewstep.training.trainer.Trainer on exact mixture samples); MLP hidden "
             f"{results['hidden']} depth {results['depth']}. MMD² (unbiased RBF, bandwidths 0.05/0.2/1.0 summed) of "
             f"{results['n_eval']} samples vs as many exact mixture samples; mean ± std over seeds. Bars: the exact "
             "teacher's Euler sampler at 4 and 8 NFE on the same noise. Pass: mean 1-NFE < mean Euler-4 and mean "
             "2-NFE < mean Euler-8. Multi-step: uniform deterministic jumps (consistency students: fresh-noise "
             "γ=1 sampling). ms/step: median over 30 timed iterations; × FM: ratio to flow_matching on the same "
             "network and batch (noisy on a shared CPU).", "",
             "| method | preset | lr | embedding | 1 NFE | 2 NFE | 4 NFE | Euler 4 | Euler 8 "
             "| 1<E4 | 2<E8 | ms/step | × FM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["preset"]) for r in results["runs"]}, key=lambda k: (k[1], k[0]))
    for name, preset in keys:
        runs = [r for r in results["runs"] if r["method"] == name and r["preset"] == preset]
        m = {k: [_get(r["mmd2"], k) for r in runs] for k in (1, 2, 4)}
        bars = results["bars"][preset]
        b4, b8 = _get(bars, 4), _get(bars, 8)
        timed = next((r for r in runs if r["step_s"] is not None), runs[0])
        step = timed["step_s"] if timed["step_s"] is not None else float("nan")
        fm = timed.get("fm_step_s", results["fm_step_s"][preset])
        ok1 = "yes" if statistics.fmean(m[1]) < statistics.fmean(b4) else "**no**"
        ok2 = "yes" if statistics.fmean(m[2]) < statistics.fmean(b8) else "**no**"
        emb = ", ".join(f"{k}={v}" for k, v in sorted((runs[0].get("student") or {}).items())) or "default"
        lines.append(f"| {name} | {preset} | {runs[0]['train'].get('lr')} | {emb} | {_fmt(m[1])} | {_fmt(m[2])} | "
                     f"{_fmt(m[4])} | {_fmt(b4)} | {_fmt(b8)} | {ok1} | {ok2} | {1000 * step:.1f} | {step / fm:.2f} |")
    mids = sorted({tm for r in results["runs"] for tm in r.get("mmd2_mid", {})}, key=float)
    if mids:
        lines += ["", "2 NFE on the grid (1, t_mid, 0) (same sampler kind and noise; the Euler-8 bar as above):", "",
                  "| method | preset | t_mid | 2 NFE | 2<E8 |", "|---|---|---|---|---|"]
        for name, preset in keys:
            runs = [r for r in results["runs"] if r["method"] == name and r["preset"] == preset]
            b8 = statistics.fmean(_get(results["bars"][preset], 8))
            for tm in mids:
                v = [r["mmd2_mid"][tm] for r in runs if tm in r.get("mmd2_mid", {})]
                if v:
                    ok = "yes" if statistics.fmean(v) < b8 else "**no**"
                    lines.append(f"| {name} | {preset} | {tm} | {_fmt(v)} | {ok} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write ``out`` (markdown) and ``out`` with suffix .json; print the table."""
    table = summarize(results)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Method benchmark\n\n" + table)
    serial = json.loads(json.dumps(results, default=str))
    out.with_suffix(".json").write_text(json.dumps(serial, indent=1))
