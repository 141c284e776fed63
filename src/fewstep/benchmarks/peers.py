r"""Peers side by side: rectified-flow-pytorch's Reflow and MeanFlow and torchcfm's OT-CFM next to fewstep.

Needs the optional extra (``pip install "fewstep[peers]"``; see docs/results/peers.md for the CPU-torch workaround).
Every peer trains the same :class:`fewstep.networks.mlp.MLP` (hidden 256, depth 4, the embedding options of its
fewstep counterpart's shipped config) with the same batch, number of steps, optimizer recipe (Adam, lr, schedule,
gradient clipping, EMA of the counterpart's ``configs/<name>.yaml``) on exact ring8 samples, and is sampled and
scored exactly like fewstep's students: uniform deterministic jumps from t = 1 to 0 of the EMA network wrapped as a
:class:`fewstep.core.flowmap.FlowMap` (Euler steps for the velocity students), MMD² of
:func:`fewstep.evaluation.evaluate.evaluate_flowmap` against exact teacher samples. Peer losses and time samplers
are the packages' own; :mod:`fewstep.benchmarks.peer_adapters` only maps the time conventions.

Peers and counterparts: ``rfp_reflow`` <-> ``reflow`` (peer pairs: its frozen model = the exact teacher, sampled
by the peer's own 16-point midpoint ODE every step), ``rfp_meanflow`` <-> ``meanflow``, ``cfm_otcfm`` <->
``flow_matching``. Example::

    python -m fewstep.benchmarks.peers --seeds 0 1 2 --steps 2000 --out docs/results/peers.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.benchmarks.method_bench_recipe import build_method, method_config, student_options, train_method
from fewstep.benchmarks.peer_adapters import peer_loss
from fewstep.config.schema import TrainConfig
from fewstep.core.flowmap import FlowMap
from fewstep.evaluation.evaluate import evaluate_flowmap, evaluate_velocity_solver
from fewstep.networks.mlp import MLP
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.training.optim import EMA, lr_factor

__all__ = ["PEERS", "NOTES", "train_peer", "run", "summarize", "main"]

#: peer name -> (fewstep counterpart whose config gives the network options and train recipe, parameterization)
PEERS: dict[str, tuple[str, str]] = {
    "rfp_reflow": ("reflow", "velocity"),
    "rfp_meanflow": ("meanflow", "average_velocity"),
    "cfm_otcfm": ("flow_matching", "velocity"),
}


NOTES = """Rows: `rfp_*` = rectified-flow-pytorch 0.14.0 (lucidrains), `cfm_otcfm` = torchcfm 1.0.7
(`ExactOptimalTransportConditionalFlowMatcher`, sigma 0); the others are fewstep's methods with their shipped
`configs/<name>.yaml` (method, student embedding and optimizer recipe; steps and batch set to the common budget).
Each peer trains the same MLP (hidden 256, depth 4) as its fewstep counterpart (rfp_reflow and cfm_otcfm: the
velocity MLP of reflow / flow_matching; rfp_meanflow: meanflow's student embedding) with the counterpart's
optimizer recipe (Adam, lr, schedule, gradient clipping, EMA), on exact ring8 samples; the peer's own loss and time
sampler are used unchanged. Sampling and metric are fewstep's for every row: uniform deterministic jumps of the EMA
network from t = 1 to 0 (Euler steps for the velocity students, average-velocity jumps for the MeanFlows; the
peer MeanFlow's own `slow_sample` would take Euler steps with delta 0 instead), MMD² (bandwidths 0.05/0.2/1 summed)
of 2000 samples vs as many exact samples (`fewstep.evaluation.evaluate.evaluate_flowmap`). Train wall time includes
pair generation: fewstep reflow caches 20000 RK4-64 teacher pairs first, the peer Reflow samples fresh pairs from
the exact teacher with its own 16-point midpoint ODE at every step. Wall times come from a CPU shared with about
seven other jobs (compare them only within this table, roughly).

Install (CPU torch): `pip install -c <(echo torch==2.13.0) -e ".[peers]"` (the pin stops pip from replacing the
CPU torch with a CUDA build), then `pip uninstall torchvision` if `import torchvision` fails: the PyPI torchvision
0.28.0 wheel that rectified-flow-pytorch pulls does not load next to torch 2.13.0+cpu (`operator torchvision::nms
does not exist`); `make test-peers` does both. rectified-flow-pytorch imports torchvision only for image saving and
LPIPS, so `fewstep.benchmarks.peers.load_rectified_flow_pytorch` stubs those names when torchvision is absent.
Second workaround: `Reflow.forward` in 0.14.0 reads `self.device`, defined as a plain method, so the benchmark sets
the attribute on the instance. The peers' tests run with `pytest -m peers` (excluded from the default run).
"""


def _train_config(counterpart: str, steps: int, batch: int) -> TrainConfig:
    """The counterpart's shipped train recipe (as method_bench builds it) with the common steps and batch."""
    _, ytrain = method_config(counterpart, {})
    fields = set(TrainConfig.__dataclass_fields__)
    train = {k: v for k, v in ytrain.items() if k in fields}
    train.setdefault("lr", 1e-3)  # method_bench's default lr
    return TrainConfig(**{**train, "steps": steps, "batch_size": batch, "progress": False, "tensorboard": False})


def train_peer(
    name: str, teacher: GaussianMixtureTeacher, steps: int, batch: int, seed: int, hidden: int = 256, depth: int = 4
) -> tuple[FlowMap, float]:
    """Train peer ``name`` with the counterpart's recipe; returns (EMA student as a FlowMap, wall seconds)."""
    counterpart, param = PEERS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MLP(
        teacher.dim, hidden=hidden, depth=depth, use_s=param == "average_velocity", **student_options(counterpart, {})
    )
    cfg = _train_config(counterpart, steps, batch)
    loss_fn = peer_loss(name, net, teacher, batch, gen)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    ema = EMA(net, cfg.ema_decays, cfg.ema_warmup) if cfg.ema_decays else None
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(net)
    wall = time.perf_counter() - t0
    out = ema.copies[ema.decays[0]] if ema is not None else net
    return FlowMap(out, param).eval(), wall


def _fewstep(
    name: str, teacher: GaussianMixtureTeacher, steps: int, batch: int, seed: int, hidden: int, depth: int
) -> tuple[FlowMap, float]:
    """fewstep's method ``name`` with its shipped config, trained as method_bench does; (EMA student, wall s)."""
    cfg, _ = method_config(name, {})
    train = {
        k: v
        for k, v in vars(_train_config(name, steps, batch)).items()
        if k not in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints", "progress", "tensorboard")
    }
    torch.manual_seed(seed)
    method = build_method(name, teacher, cfg, hidden, depth, **student_options(name, {}))
    t0 = time.perf_counter()
    student, _ = train_method(method, teacher, train, seed)
    return student.eval(), time.perf_counter() - t0


def _fmt(vals: list[float], digits: int = 4) -> str:
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {std:.{digits}f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train every peer and fewstep counterpart per seed; write ``args.out`` (markdown) and its JSON; return rows."""
    import json

    from fewstep.teachers.presets import load_preset

    torch.set_num_threads(args.threads)
    teacher = load_preset(args.preset)
    res: dict[str, Any] = {
        "command": "python -m fewstep.benchmarks.peers " + shlex.join(args.argv),
        "preset": args.preset,
        "seeds": args.seeds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "n_eval": args.n,
        "runs": [],
        "bars": {
            k: [evaluate_velocity_solver(teacher, teacher, "euler", k, n=args.n, seed=s)["mmd2"] for s in args.seeds]
            for k in (4, 8)
        },
    }
    for seed in args.seeds:  # seed-major: an interrupted run still has every method at the first seeds
        for name in args.methods:
            if name in PEERS:
                student, wall = train_peer(name, teacher, args.steps, args.batch_size, seed, args.hidden, args.depth)
            else:
                student, wall = _fewstep(name, teacher, args.steps, args.batch_size, seed, args.hidden, args.depth)
            with torch.no_grad():
                m = evaluate_flowmap(student, teacher, nfe=(1, 2, 4), n=args.n, seed=seed)
            rec = {"method": name, "seed": seed, "train_wall_s": wall, "mmd2": {k: v["mmd2"] for k, v in m.items()}}
            res["runs"].append(rec)
            print(
                f"{name:>14s} seed {seed}: "
                + "  ".join(f"{k}-NFE {v:.4f}" for k, v in rec["mmd2"].items())
                + f"  ({wall:.0f} s)",
                flush=True,
            )
            out = Path(args.out)  # rewritten after every run, so an interrupted benchmark keeps its finished rows
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(res, indent=1))
            out.write_text(summarize(res))
    return res


def summarize(res: dict[str, Any]) -> str:
    """Markdown table: per method, MMD² at 1/2/4 NFE (mean ± std over seeds), training wall time, the Euler bars."""
    b4, b8 = res["bars"][4] if 4 in res["bars"] else res["bars"]["4"], res["bars"].get(8, res["bars"].get("8"))
    lines = [
        "# Peers side by side (generated by fewstep.benchmarks.peers)",
        "",
        "Command:",
        "",
        f"    {res['command']}",
        "",
        f"Preset {res['preset']}; seeds {res['seeds']}; budget {res['steps']} steps × batch {res['batch_size']}, "
        f"MLP as in each counterpart's config; MMD² of {res['n_eval']} samples vs exact teacher samples, mean ± "
        f"std over seeds. Bars (teacher Euler): 4 NFE {_fmt(b4)}, 8 NFE {_fmt(b8)}.",
        "",
        "| method | 1 NFE | 2 NFE | 4 NFE | train wall s |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["method"] for r in res["runs"]):
        runs = [r for r in res["runs"] if r["method"] == name]
        cells = [_fmt([r["mmd2"][k] if k in r["mmd2"] else r["mmd2"][str(k)] for r in runs]) for k in (1, 2, 4)]
        lines.append(f"| {name} | {' | '.join(cells)} | {_fmt([r['train_wall_s'] for r in runs], 0)} |")
    return "\n".join(lines) + "\n\n" + NOTES


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=[*PEERS, "reflow", "meanflow", "flow_matching"])
    p.add_argument("--preset", default="ring8")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n", type=int, default=2000, help="evaluation samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results/peers.md")
    p.add_argument("--report", default=None, help="only rewrite --out from this earlier run's JSON")
    args = p.parse_args(argv)
    args.argv = argv
    if args.report:
        import json

        res = json.loads(Path(args.report).read_text())
        Path(args.out).write_text(summarize(res))
        return res
    return run(args)


if __name__ == "__main__":
    main()
