"""Seconds per training step and peak memory of each method on a random SD3-style teacher of a chosen width.

Builds ``SD3Transformer2DModel`` from a config (random weights, nothing downloaded), saves it with a
``FlowMatchEulerDiscreteScheduler`` and a condition folder (random text embeddings and latents), then runs
``fewstep distill`` (``student.kind: teacher``) for each method, each in its own process so that peak memory
(CUDA: ``max_memory_allocated``; CPU: the process's peak RSS) is per method. The first step (warm-up) is
excluded from the time per step.

Run::

    python -m fewstep.integrations.diffusers.bench --methods reflow meanflow cd dmd2 --steps 6
    python -m fewstep.integrations.diffusers.bench --width 1536 --layers 24 --latent 64 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

METHOD_CFG = {"reflow": {"n_pairs": 8, "pair_steps": 4, "pair_solver": "euler"}, "meanflow": {},
              "cd": {"n_steps": 4}, "dmd2": {"fake_updates": 1}}


def make_teacher(root: Path, width: int, layers: int, latent: int, heads: int, tokens: int = 8, n: int = 64) -> None:
    """Save a random SD3 transformer (width = heads * 64 / heads * head_dim) + scheduler + condition folder."""
    import diffusers

    from fewstep.integrations.diffusers.conditioning import save_condition_table

    head_dim = width // heads
    m = diffusers.SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                                        joint_attention_dim=width, caption_projection_dim=width,
                                        pooled_projection_dim=width, pos_embed_max_size=max(latent // 2, 16))
    m.save_pretrained(root / "sd3" / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "sd3" / "scheduler")
    g = torch.Generator().manual_seed(0)
    save_condition_table(root / "cond", {"encoder_hidden_states": torch.randn(n, tokens, width, generator=g),
                                         "pooled_projections": torch.randn(n, width, generator=g)},
                         null={"encoder_hidden_states": torch.zeros(1, tokens, width),
                               "pooled_projections": torch.zeros(1, width)},
                         latents=torch.randn(n, 4, latent, latent, generator=g))


def run_one(root: Path, method: str, steps: int, batch: int, device: str, dtype: str) -> dict:
    """Train ``method`` for ``steps`` steps; returns seconds per step (after the first) and peak memory in MiB."""
    from fewstep.config.build import build_run
    from fewstep.config.schema import load_config

    if device == "cpu":
        torch.set_num_threads(1)
    cfg = {"seed": 0, "device": device,
           "teacher": {"kind": "diffusers", "path": str(root / "sd3"), "guidance": 1.0 if method == "cd" else 2.0,
                       "kwargs": {"dtype": dtype}},
           "data": {"name": "embeddings", "kwargs": {"path": str(root / "cond")}}, "student": {"kind": "teacher"},
           "method": {"name": method, "cfg": METHOD_CFG[method]},
           "train": {"steps": steps, "batch_size": batch, "lr": 1e-5, "ema_decays": [0.99], "progress": False,
                     "tensorboard": False, "log_every": 1}, "eval": {"nfe": []}}
    p = root / f"{method}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    trainer = build_run(load_config(p), run_dir=None)
    trainer.prepare()
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for k in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(k)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    n_par = sum(p.numel() for p in trainer.method.student.parameters())
    return {"method": method, "s_per_step": sum(times[1:]) / max(len(times) - 1, 1), "peak_mib": mem,
            "student_params": n_par}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHOD_CFG))
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="teacher dtype (bfloat16: no-grad teacher at half memory)")
    ap.add_argument("--root", default=None, help="folder of an existing teacher (internal: one method per process)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(Path(a.root), a.one, a.steps, a.batch, a.device, a.dtype)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_teacher(root, a.width, a.layers, a.latent, a.heads)
        print(f"SD3 teacher width {a.width}, {a.layers} layers, latent 4x{a.latent}x{a.latent}, batch {a.batch}, "
              f"{a.device}, teacher {a.dtype}")
        for m in a.methods:
            cmd = [sys.executable, "-m", "fewstep.integrations.diffusers.bench", "--root", str(root), "--one", m,
                   "--steps", str(a.steps), "--batch", str(a.batch), "--device", a.device, "--dtype", a.dtype]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"  {m:10s} {r['s_per_step']:.3f} s/step  peak {r['peak_mib']:.0f} MiB  "
                  f"student {r['student_params']} params")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
