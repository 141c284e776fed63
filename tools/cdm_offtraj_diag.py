"""Train one cdm bench cell (s2000 budget, seed 0) with extra overrides; print 1/2/4-NFE MMD^2 (EMA student,
deterministic uniform grid, the cell's noise), the bars (teacher Euler 4 / 8), then per fake bin k and point set:
n, E|x0_fake - x0_real|^2 at tau ~ U[0.02, 0.98] (and at tau < 0.3) against the exact teacher of the analytic
mixture, and the MMD^2 of the raw student's x0-predictions (n <= 2000) to the target.  Sets: "on" = anchors drawn as
in training (routed by sigma), "off" = their off-trajectory points (routed by sigma_s, the fake copies), "own_off" =
the same points scored by the off-trajectory term's fake (`offtraj_fake`; a fresh draw for the default split).
Used by docs/results/cdm_offtraj.md.  usage (repo root; FEWSTEP_BENCH_INIT caches the flow-matching init):
    OMP_NUM_THREADS=1 python tools/cdm_offtraj_diag.py ring8 [method.cfg.offtraj_fake=own ...]"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdm_grid_screen import grid_mmd2, train_cell  # noqa: E402

from fewstep.benchmarks.leaderboard.targets import sample_metrics, teacher_curve  # noqa: E402
from fewstep.methods._shared.dm import anchor_index, backward_simulate, renoise, renoise_time  # noqa: E402
from fewstep.methods._shared.split_fake import fake_bin  # noqa: E402
from fewstep.teachers.base import teacher_velocity  # noqa: E402


def main(target: str, overrides: list[str]) -> None:
    """Train the cell, print the sample metrics (one JSON line) and the fake-error table (one JSON object)."""
    torch.set_num_threads(1)
    t0 = time.time()
    tr, f, x1, ref = train_cell("cdm", target, tuple(overrides))
    train_s = time.time() - t0

    def grid(*ts: float) -> float:
        return grid_mmd2(f, x1, ref, ts)

    bars = teacher_curve(target, 0, 2000)["euler"]
    with torch.no_grad():
        res = {"target": target, "set": overrides, "nfe1": grid(1, 0), "nfe2": grid(1, .5, 0),
               "nfe4": grid(1, .75, .5, .25, 0), "bar1": bars["4"]["mmd2"] if "4" in bars else bars[4]["mmd2"],
               "bar2": bars["8"]["mmd2"] if "8" in bars else bars[8]["mmd2"], "train_s": train_s}
        res["pass2"] = res["nfe2"] < res["bar2"]
        res["pass1"] = res["nfe1"] < res["bar1"]
        print(json.dumps(res), flush=True)
        print(json.dumps(fake_errors(tr.method, x1, ref), indent=0), flush=True)


def fake_errors(m, x1: torch.Tensor, ref: torch.Tensor) -> dict:  # noqa: ANN001
    """Per bin and point set: n, mean |x0_fake - x0_real|^2 (all tau, tau < 0.3), MMD^2 of the predictions."""
    student = m.student  # the raw student: the fake models its predictions
    k_bins = len(m.fake.copies) if hasattr(m.fake, "copies") else 1
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    rows: dict[str, list] = {"on": [], "off": [], "own_off": []}
    for _ in range(16):
        z = torch.randn(512, *x1.shape[1:], generator=g)
        sched = m.student_schedule()
        idx = anchor_index(torch.rand(512, generator=g), sched.numel() - 1)
        a = backward_simulate(student, z, sched, idx, None, grad=False)
        sig_s = renoise_time(torch.rand(512, generator=g), "uniform")
        x_s = m.off_trajectory_point(a.x, a.sigma, a.velocity, a.x0, sig_s)
        x0_s = student(x_s, sig_s, torch.zeros_like(sig_s))
        for name, x0, sig, fk in (("on", a.x0, a.sigma, m.fake_for(a.sigma)),
                                  ("off", x0_s, sig_s, m.fake_for(sig_s)),
                                  ("own_off", x0_s, sig_s, m.offtraj_fake_for(sig_s))):
            tau = renoise_time(torch.rand(512, generator=g), "uniform")
            xt = renoise(x0, tau, torch.randn(x0.shape, generator=g))
            dv = fk.velocity(xt, tau, None) - teacher_velocity(m.teacher, xt, tau, None, 1.0)
            rows[name].append((fake_bin(sig, k_bins), (tau[:, None] * dv).pow(2).sum(1), x0, tau))
    out = {}
    for name, rr in rows.items():
        bins, err, x0, tau = (torch.cat([r[i] for r in rr]) for i in range(4))
        for k in range(k_bins):
            sel = bins == k
            if int(sel.sum()) < 200:
                continue
            xs = x0[sel][:2000]
            lo = sel & (tau < 0.3)
            out[f"{name}/bin{k}"] = {"n": int(sel.sum()), "x0err": float(err[sel].mean()),
                                     "x0err_tau<.3": float(err[lo].mean()) if int(lo.sum()) else None,
                                     "mmd2_pred": sample_metrics(xs, ref[: xs.shape[0]])["mmd2"]}
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
