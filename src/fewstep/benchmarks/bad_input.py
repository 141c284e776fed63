r"""Bad-input and fault table: run each case through the ``fewstep`` CLI in a fresh process, record rc + last line.

Every case is a command a user could type (plus a few library calls, each wrapped the way a script would catch a
``ValueError``). A case passes when it ends as one clear line: exit status != 0 and a last line starting with
``fewstep: error:`` (or argparse's ``fewstep ...: error:``) and no Python traceback anywhere in the output; cases
marked ``ok`` must succeed (rc 0), e.g. a warning plus results. Writes the markdown table (docs/bad_input.md)::

    python -m fewstep.benchmarks.bad_input --out docs/bad_input.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["CASES", "run_case", "main"]

SMALL = ["device=cpu", "student.hidden=16", "student.depth=2", "student.emb_dim=8", "train.batch_size=64",
         "train.log_every=2", "train.tensorboard=false", "train.progress=false", "eval.nfe=[]", "train.steps=2"]
D = ["distill", "--method", "flow_matching", "data.name=ring8", *SMALL]  # a distill command to add one bad value to
EYE2 = [[1.0, 0.0], [0.0, 1.0]]

#: (what, argv after ``fewstep`` or ``lib:<python snippet>``, expect "error" or "ok"). ``{w}`` is the work folder
#: holding fixtures: ``run`` (unconditional flow-matching run), ``cond`` (moons, conditional), ``corrupt``,
#: ``empty`` (config but no checkpoint), ``used`` (a run folder to reuse), files ``bad.yaml``, ``list.yaml``,
#: ``sect.yaml``, ``nan.json``, ``inf.json``, ``str.json``, ``w.json``, ``pd.json``, ``syn.json``, ``afile``.
CASES: list[tuple[str, list[str] | str, str]] = [
    ("--threads 0", ["--threads", "0", "methods"], "error"),
    ("--threads negative", ["--threads", "-2", "methods"], "error"),
    ("--threads not a number", ["--threads", "two", "methods"], "error"),
    ("unknown command", ["frobnicate"], "error"),
    ("no command", [], "error"),
    ("unknown method", ["distill", "--method", "nope", *SMALL], "error"),
    ("unknown config key", [*D, "train.lrr=1"], "error"),
    ("int key given a word", [*D, "train.steps=ten"], "error"),
    ("negative steps", [*D, "train.steps=-1"], "error"),
    ("negative lr", [*D, "train.lr=-1"], "error"),
    ("lr NaN", [*D, "train.lr=.nan"], "error"),
    ("lr inf", [*D, "train.lr=.inf"], "error"),
    ("batch_size 0", [*D, "train.batch_size=0"], "error"),
    ("batch not divisible by grad_accum", [*D, "train.batch_size=63", "train.grad_accum=2"], "error"),
    ("unknown optimizer", [*D, "train.optimizer=sgd"], "error"),
    ("unknown lr schedule", [*D, "train.lr_schedule=step"], "error"),
    ("unknown amp mode", [*D, "train.amp=fp8"], "error"),
    ("betas of length 1", [*D, "train.betas=[0.9]"], "error"),
    ("EMA decay above 1", [*D, "train.ema_decays=[1.5]"], "error"),
    ("negative grad_clip", [*D, "train.grad_clip=-1"], "error"),
    ("eval.nfe=[0]", [*D, "eval.nfe=[0]"], "error"),
    ("eval.n_samples=0", [*D, "eval.n_samples=0"], "error"),
    ("eval.n_samples too small", [*D, "eval.n_samples=10"], "error"),
    ("student.hidden=0", [*D, "student.hidden=0"], "error"),
    ("student.depth=0", [*D, "student.depth=0"], "error"),
    ("unknown activation", [*D, "student.activation=relu"], "error"),
    ("unknown parameterization", [*D, "student.parameterization=foo"], "error"),
    ("unknown method.cfg key", [*D, "method.cfg.norm_pp=1"], "error"),
    ("method.cfg value of the wrong type", [*D, "method.cfg.cond_drop=abc"], "error"),
    ("unknown teacher kind", [*D, "teacher.kind=magic"], "error"),
    ("unknown preset", ["distill", "--method", "cd", "teacher.name=nope", *SMALL], "error"),
    ("mixture JSON missing", ["distill", "--method", "cd", "teacher.kind=json", "teacher.path={w}/none.json", *SMALL],
     "error"),
    ("mixture JSON syntax error", ["distill", "--method", "cd", "teacher.kind=json", "teacher.path={w}/syn.json",
                                   *SMALL], "error"),
    ("mixture JSON with NaN", ["distill", "--method", "cd", "teacher.kind=json", "teacher.path={w}/nan.json", *SMALL],
     "error"),
    ("mixture JSON with Infinity", ["distill", "--method", "cd", "teacher.kind=json", "teacher.path={w}/inf.json",
                                    *SMALL], "error"),
    ("mixture JSON with strings", ["distill", "--method", "cd", "teacher.kind=json", "teacher.path={w}/str.json",
                                   *SMALL], "error"),
    ("mixture weights not summing to 1", ["distill", "--method", "cd", "teacher.kind=json", "teacher.path={w}/w.json",
                                          *SMALL], "error"),
    ("covariance not positive definite", ["distill", "--method", "cd", "teacher.kind=json",
                                          "teacher.path={w}/pd.json", *SMALL], "error"),
    ("teacher.kind=run without a path", ["distill", "--method", "cd", "teacher.kind=run", *SMALL], "error"),
    ("teacher.kind=run on a non-run folder", ["distill", "--method", "cd", "teacher.kind=run", "teacher.path={w}",
                                              *SMALL], "error"),
    ("unknown dataset", ["distill", "--method", "flow_matching", "data.name=nope", *SMALL[:-1]], "error"),
    ("override without '='", [*D, "train.steps"], "error"),
    ("override with invalid YAML", [*D, "train.betas=[0.9"], "error"),
    ("sampler.gamma out of range", [*D, "sampler.gamma=2"], "error"),
    ("unknown sampler grid", [*D, "sampler.grid=cosine"], "error"),
    ("--config missing", ["distill", "--method", "cd", "--config", "{w}/none.yaml"], "error"),
    ("--config is a directory", ["distill", "--method", "cd", "--config", "{w}"], "error"),
    ("--config YAML syntax error", ["distill", "--method", "cd", "--config", "{w}/bad.yaml"], "error"),
    ("--config top level is a list", ["distill", "--method", "cd", "--config", "{w}/list.yaml"], "error"),
    ("--config unknown section", ["distill", "--method", "cd", "--config", "{w}/sect.yaml"], "error"),
    ("--resume with no runs/ folder", ["distill", "--method", "flow_matching", "--resume"], "error"),
    ("--resume on a non-run folder", ["distill", "--resume", "--run-dir", "{w}"], "error"),
    ("--resume with a bad override", ["distill", "--resume", "--run-dir", "{w}/run", "method.cfg.nope=1"], "error"),
    ("--resume and --overwrite", ["distill", "--resume", "--overwrite", "--run-dir", "{w}/run"], "error"),
    ("new run in a folder with checkpoints", [*D, "--run-dir", "{w}/used"], "error"),
    ("--run-dir is a file", [*D, "--run-dir", "{w}/afile"], "error"),
    ("--resume when every checkpoint is corrupt", ["distill", "--resume", "--run-dir", "{w}/corrupt",
                                                   "train.steps=4"], "error"),
    ("diverging run (lr=1e8, no clipping)", [*D[:-1], "train.steps=40", "train.lr=1e8", "train.grad_clip=0",
                                             "--run-dir", "{w}/div"], "error"),
    ("sample: run folder missing", ["sample", "{w}/none"], "error"),
    ("sample: run folder is a file", ["sample", "{w}/afile"], "error"),
    ("sample: folder without checkpoint", ["sample", "{w}/empty"], "error"),
    ("sample: every checkpoint corrupt", ["sample", "{w}/corrupt"], "error"),
    ("sample --n 0", ["sample", "{w}/run", "--n", "0"], "error"),
    ("sample --n negative", ["sample", "{w}/run", "--n", "-5"], "error"),
    ("sample --n not a number", ["sample", "{w}/run", "--n", "many"], "error"),
    ("sample --nfe 0", ["sample", "{w}/run", "--nfe", "0"], "error"),
    ("sample --label on an unconditional student", ["sample", "{w}/run", "--label", "1"], "error"),
    ("sample --label negative", ["sample", "{w}/cond", "--label", "-3"], "error"),
    ("sample --label out of range", ["sample", "{w}/cond", "--label", "2"], "error"),
    ("sample a conditional student without --label", ["sample", "{w}/cond", "--n", "4", "--out", "{w}/u"], "ok"),
    ("sample --grid not ending at 0", ["sample", "{w}/run", "--grid", "1,0.5"], "error"),
    ("sample --grid not ending at 0, --allow-partial", ["sample", "{w}/run", "--grid", "1,0.5", "--allow-partial",
                                                        "--n", "4", "--out", "{w}/p"], "ok"),
    ("sample --grid increasing", ["sample", "{w}/run", "--grid", "0,0.5,1"], "error"),
    ("sample --grid with a word", ["sample", "{w}/run", "--grid", "1,a,0"], "error"),
    ("sample --grid outside [0, 1]", ["sample", "{w}/run", "--grid", "2,1,0"], "error"),
    ("sample --grid unknown rule", ["sample", "{w}/run", "--grid", "cosine"], "error"),
    ("sample --gamma 2", ["sample", "{w}/run", "--gamma", "2"], "error"),
    ("sample --gamma nan", ["sample", "{w}/run", "--gamma", "nan"], "error"),
    ("sample --out under a file", ["sample", "{w}/run", "--n", "4", "--out", "{w}/afile/x"], "error"),
    ("eval --n below the minimum", ["eval", "{w}/run", "--n", "10"], "error"),
    ("eval --nfe 0", ["eval", "{w}/run", "--nfe", "0"], "error"),
    ("eval --gamma negative", ["eval", "{w}/run", "--gamma", "-1"], "error"),
    ("eval with explicit grid times", ["eval", "{w}/run", "--grid", "1,0.5,0"], "error"),
    ("eval: every checkpoint corrupt", ["eval", "{w}/corrupt"], "error"),
    ("diagnose: unknown diagnostic", ["diagnose", "xyz"], "error"),
    ("demo --steps 0", ["demo", "--steps", "0", "--out", "{w}/demo"], "error"),
    ("library: student input of the wrong event shape",
     "f = FlowMap(MLP(2, hidden=8, depth=1)); f(torch.randn(4, 3), 1.0, 0.0)", "error"),
    ("library: integer student input",
     "f = FlowMap(MLP(2, hidden=8, depth=1)); f(torch.ones(4, 2, dtype=torch.long), 1.0, 0.0)", "error"),
    ("library: float64 student input (cast)", "f = FlowMap(MLP(2, hidden=8, depth=1)); "
     "print(f(torch.randn(4, 2, dtype=torch.float64), 1.0, 0.0).dtype)", "ok"),
    ("library: s > t for a flow map", "f = FlowMap(MLP(2, hidden=8, depth=1)); f(torch.randn(4, 2), 0.2, 0.7)",
     "error"),
    ("library: teacher.sample(-1)", "load_preset('ring8').sample(-1)", "error"),
    ("library: fewstep.train(threads=0)", "fewstep.train('cd', steps=1, threads=0)", "error"),
]

LIB_PRELUDE = ("import sys, torch, fewstep\nfrom fewstep.core.flowmap import FlowMap\n"
               "from fewstep.networks.mlp import MLP\nfrom fewstep.teachers.presets import load_preset\n"
               "try:\n    {code}\nexcept (ValueError, TypeError) as e:\n"
               "    print(f'{{type(e).__name__}}: {{e}}', file=sys.stderr); sys.exit(2)\n")


def _fixtures(w: Path) -> None:
    """Tiny run folders and bad files in ``w`` (two short trainings, a few seconds each)."""
    cli = [sys.executable, "-m", "fewstep.cli"]
    subprocess.run([*cli, "distill", "--method", "flow_matching", "--run-dir", str(w / "run"), "data.name=ring8",
                    "method.cfg.cond_drop=0.0", *SMALL], check=True, capture_output=True, cwd=w)
    subprocess.run([*cli, "distill", "--method", "flow_matching", "--run-dir", str(w / "cond"), "data.name=moons",
                    *SMALL], check=True, capture_output=True, cwd=w)
    for name in ("used", "corrupt", "empty"):
        shutil.copytree(w / "run", w / name)
    for ck in (w / "corrupt").glob("ckpt-*"):
        (ck / "tensors.safetensors").write_bytes(b"garbage")
    for ck in (w / "empty").glob("ckpt-*"):
        shutil.rmtree(ck)
    (w / "bad.yaml").write_text("train:\n  steps: [1, 2\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "sect.yaml").write_text("trian: {steps: 2}\n")
    (w / "afile").write_text("not a folder\n")
    (w / "syn.json").write_text("{\"weights\": [1.0,")
    mix = {"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [EYE2]}
    (w / "nan.json").write_text(json.dumps({**mix, "means": [[float("nan"), 0.0]]}))
    (w / "inf.json").write_text(json.dumps({**mix, "covariances": [[[float("inf"), 0.0], [0.0, 1.0]]]}))
    (w / "str.json").write_text(json.dumps({**mix, "weights": ["one"]}))
    (w / "w.json").write_text(json.dumps({**mix, "weights": [0.5]}))
    (w / "pd.json").write_text(json.dumps({**mix, "covariances": [[[1.0, 2.0], [2.0, 1.0]]]}))


def run_case(argv: list[str] | str, w: Path, fresh: bool = False, timeout: float = 300.0) -> tuple[int, str, bool]:
    """Run one case in ``w``; returns (rc, last non-empty output line, traceback seen).

    In-process by default (``fewstep.cli.main`` with stdout/stderr captured; an exception escaping ``main`` is
    exactly what would print a traceback), or in a fresh ``python -m fewstep.cli`` process when ``fresh``.
    """
    if fresh or isinstance(argv, str):
        if isinstance(argv, str):
            cmd = [sys.executable, "-c", LIB_PRELUDE.format(code=argv)]
        else:
            cmd = [sys.executable, "-m", "fewstep.cli", *[a.format(w=w) for a in argv]]
        env = {**os.environ, "PYTHONWARNINGS": "default"}
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=w, timeout=timeout, env=env)
        out, err, rc = p.stdout, p.stderr, p.returncode
    else:
        import contextlib
        import io
        import traceback
        import warnings

        from fewstep.cli import main as cli_main

        so, se = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(w)
        try:
            with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se), warnings.catch_warnings():
                warnings.simplefilter("default")
                try:
                    rc = int(cli_main([a.format(w=w) for a in argv]) or 0)
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else 1
                except BaseException:  # noqa: BLE001 - what a user would see as a traceback
                    traceback.print_exc()
                    rc = 1
        finally:
            os.chdir(cwd)
        out, err = so.getvalue(), se.getvalue()
    text = err.strip() or out.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1].replace(str(w), "W") if lines else ""
    return rc, last, "Traceback (most recent call last)" in out + err


def _verdict(rc: int, last: str, tb: bool, expect: str) -> str:
    if tb:
        return "**traceback**"
    if expect == "ok":
        return "ok (runs)" if rc == 0 else "**failed**"
    one_line = last.startswith("fewstep: error:") or (last.startswith("fewstep") and ": error:" in last) or \
        last.startswith(("ValueError:", "TypeError:"))
    return "clear error" if rc != 0 and one_line else "**unclear**"


def main(argv: list[str] | None = None) -> int:
    """Run every case and write the markdown table; returns 1 if any case is not a clear error / success."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/bad_input.md")
    p.add_argument("--only", type=int, nargs="*", default=None, help="run only these case numbers (1-based)")
    p.add_argument("--fresh", action="store_true", help="every CLI case in a fresh process (slow: one torch import "
                                                        "per case)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        _fixtures(w)
        for i, (what, case, expect) in enumerate(CASES, 1):
            if args.only and i not in args.only:
                continue
            rc, last, tb = run_case(case, w, fresh=args.fresh)
            verdict = _verdict(rc, last, tb, expect)
            bad += not verdict.startswith(("clear", "ok"))
            shown = ("python: " + case) if isinstance(case, str) else "fewstep " + " ".join(case)
            shown = shown.replace("{w}", "W").replace(" ".join(SMALL), "<small>")
            shown = shown.replace(" ".join(SMALL[:-1]), "<small>")
            shown = shown.replace("|", "\\|")
            rows.append(f"| {i} | {what} | `{shown}` | {rc} | {last.replace('|', chr(92) + '|')} | {verdict} |")
            print(rows[-1], flush=True)
    head = ["# Bad input and faults: what the user sees", "",
            "Every case below was run through the `fewstep` command line (`fewstep.cli.main` with its output captured, "
            "or a fresh process with `--fresh`; library cases: a short Python snippet in a fresh process that prints "
            "the exception a script would catch). rc = exit status; message = the last "
            "line of the output. `W` is the scratch folder with tiny fixture runs; `<small>` stands for "
            f"`{' '.join(SMALL)}`. {len(rows)} cases, {bad} not a clear one-line error or success; none ends in a "
            "traceback." if bad == 0 else f"{bad} cases need work.", "",
            "Regenerate: `python -m fewstep.benchmarks.bad_input --out docs/bad_input.md` "
            f"({time.perf_counter() - t0:.0f} s on a shared 2-core CPU).", "",
            "| # | case | command | rc | message (last line) | verdict |", "|---|---|---|---|---|---|"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + rows) + "\n")
    print(f"wrote {out}: {len(rows)} cases, {bad} not clear")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
