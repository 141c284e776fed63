"""Behaviour check for refactors: train every method a few steps and print a hash of its weights.

Run it on two checkouts and diff the outputs; equal hashes mean the refactor changed no arithmetic on this path::

    PYTHONPATH=<old checkout>/src python -m fewstep.benchmarks.weights_hash > before.txt
    python -m fewstep.benchmarks.weights_hash > after.txt && diff before.txt after.txt

Each method trains 12 steps on ring8 (class-conditional for ddmd and cdm), batch 64, seed 0, an MLP 32x2
student; the hash is SHA-256 over the method's state dict and the EMA student, in float64.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch

METHODS = ["flow_matching", "reflow", "reflow_distill", "perflow", "meanflow", "splitmeanflow", "cd", "ct", "scm",
           "facm", "ayf_emd", "ayf_lmd", "shortcut", "imm", "dmd", "dmd2", "ddmd", "cdm"]
CONDITIONAL = ("cdm", "ddmd")
METHOD_CFG = {"reflow": {"n_pairs": 512}, "reflow_distill": {"n_pairs": 512}}


def weights_hash(method: str, steps: int = 12) -> tuple[str, dict[str, float]]:
    """Train ``method`` briefly and hash its weights.

    Args:
        method: A registered method name.
        steps: Training steps.

    Returns:
        The first 16 hex digits of the hash and the last logged losses.
    """
    import fewstep

    teacher = fewstep.load_preset("ring8", conditional=method in CONDITIONAL)
    tr = fewstep.train(method, teacher=teacher, steps=steps, batch_size=64, seed=0,
                       method_cfg=dict(METHOD_CFG.get(method, {})), student={"hidden": 32, "depth": 2},
                       log_every=1000)
    h = hashlib.sha256()
    for prefix, module in ((b"", tr.method), (b"ema/", tr.student(ema=True))):
        for k, v in sorted(module.state_dict().items()):
            h.update(prefix + k.encode())
            h.update(v.detach().double().cpu().numpy().tobytes())
    last = tr.history[-1] if tr.history else {}
    return h.hexdigest()[:16], {k: round(float(v), 6) for k, v in last.items() if "loss" in k}


def main(argv: list[str] | None = None) -> None:
    """Print one line per method: name, weight hash, last losses."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="*", default=METHODS)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for m in args.methods:
        digest, losses = weights_hash(m, args.steps)
        print(f"{m:15s} {digest} {losses}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
