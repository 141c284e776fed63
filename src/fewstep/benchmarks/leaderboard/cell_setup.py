r"""A cell's setup: the common budget, the run config of a cell, its design limits and the evaluation counter.

The run config is exactly what ``fewstep distill --config configs/<method>.yaml`` loads, with overrides that only set
the target and the common budget (:func:`cell_overrides`); :mod:`~fewstep.benchmarks.leaderboard.cells` trains and
evaluates it, :mod:`~fewstep.benchmarks.leaderboard.init` trains the initialisation some methods need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.benchmarks.leaderboard.learned import is_learned_target, learned_overrides
from fewstep.benchmarks.leaderboard.targets import STUDENT_NFE
from fewstep.config.schema import RunConfig, load_config
from fewstep.core.flowmap import FlowMap
from fewstep.methods.registry import get_method

__all__ = [
    "Budget",
    "CONFIG_DIR",
    "EvalCounter",
    "cell_config",
    "cell_overrides",
    "config_path",
    "design_limits",
    "shipped_design_limits",
]

CONFIG_DIR = Path(__file__).resolve().parents[4] / "configs"


@dataclass(frozen=True)
class Budget:
    """The common budget of every cell (same student size, same number of training steps and batch).

    Attributes:
        steps: Training steps.
        batch_size: Global batch per step.
        hidden: MLP width.
        depth: MLP hidden layers.
        n: Evaluation samples (and reference samples).
        probes: Evaluations during training (the last at the final step), for the time to reach the bar.
    """

    steps: int = 2000
    batch_size: int = 512
    hidden: int = 256
    depth: int = 4
    n: int = 2000
    probes: int = 4

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 2), ("hidden", 1), ("depth", 1), ("n", 100), ("probes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"bench {name} must be an int >= {lo}; got {v!r}")

    def tag(self) -> str:
        """Folder name of this budget's cells, e.g. ``s2000-b512-h256x4-n2000-p4``."""
        return f"s{self.steps}-b{self.batch_size}-h{self.hidden}x{self.depth}-n{self.n}-p{self.probes}"

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON."""
        return asdict(self)


def config_path(method: str, config_dir: Path = CONFIG_DIR) -> Path | None:
    """``configs/<method>.yaml`` if it exists, else None (the method's defaults)."""
    p = Path(config_dir) / f"{method}.yaml"
    return p if p.is_file() else None


def cell_overrides(method: str, target: str, seed: int, budget: Budget) -> list[str]:
    """The dotted overrides that put a shipped config on ``target`` at ``budget`` (nothing else changes).

    A method with teacher ODE pairs (the reflow family: ``pair_seed``) gets ``pair_seed`` = the cell seed, so the
    seeds of a cell are independent in their pairs too (the config default is 0 for every run seed).
    """
    every = max(budget.steps // budget.probes, 1)
    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    pairs = [f"method.cfg.pair_seed={seed}"] if "pair_seed" in fields else []
    if is_learned_target(target):
        source = learned_overrides(target)
    else:
        source = [
            "teacher.kind=preset",
            f"teacher.name={target}",
            "teacher.conditional=false",
            "teacher.guidance=1.0",
            "data.name=teacher",
            # unlabelled exact samples (build_method now defaults data=teacher to teacher.conditional; kept explicit:
            # the digits preset keeps its 10 classes, and a labelled student sampled without labels is broken)
            'data.kwargs={"conditional": false}',
        ]
    return [
        f"method.name={method}",
        f"seed={seed}",
        "device=cpu",
        *source,
        *pairs,
        f"student.hidden={budget.hidden}",
        f"student.depth={budget.depth}",
        f"train.steps={budget.steps}",
        f"train.batch_size={budget.batch_size}",
        f"train.eval_every={every}",
        "train.ckpt_every=0",
        "train.progress=false",
        "train.tensorboard=false",
    ]  # eval.nfe stays the config's (design_limits reads it); the trainer's own eval is off (with_eval=False)


def cell_config(
    method: str, target: str, seed: int, budget: Budget, config_dir: Path = CONFIG_DIR, extra: tuple = ()
) -> RunConfig:
    """The run config of a cell: ``configs/<method>.yaml`` (or defaults) + :func:`cell_overrides` + ``extra``."""
    get_method(method)
    over = cell_overrides(method, target, seed, budget) + list(extra)
    return load_config(config_path(method, config_dir), over, base={"method": {"name": method}})


def design_limits(cfg: RunConfig) -> dict[int, str]:
    """NFE counts at which a config cannot meet its bar by design, with the reason (from the config itself).

    * a window method (PeRFlow, ``num_windows`` W) takes one jump per window: K < W NFE skips windows;
    * a one-step generator (``n_steps: 1`` of the DMD family, or a config that evaluates only ``nfe: [1]``)
      does not claim multi-step sampling.
    """
    mcfg = get_method(cfg.method.name).make_config(**dict(cfg.method.cfg))
    out: dict[int, str] = {}
    explicit = getattr(mcfg, "windows", None)
    windows = len(explicit) - 1 if explicit else getattr(mcfg, "num_windows", None)
    if windows is not None:
        for k in STUDENT_NFE:
            if k < windows:
                out[k] = (
                    f"one jump per window and num_windows={windows}: {k} NFE cannot cover the "
                    f"{windows} windows (by design)"
                )
    one_step = getattr(mcfg, "n_steps", None) == 1 and cfg.method.name.startswith("dmd")
    if one_step or list(cfg.eval.nfe) == [1]:
        for k in STUDENT_NFE:
            if k > 1:
                out[k] = "one-step generator: multi-step sampling is not claimed by the config"
    return out


def shipped_design_limits(method: str, config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """:func:`design_limits` of the method's shipped config as it is now (string keys, as stored in cells)."""
    cfg = load_config(config_path(method, config_dir), base={"method": {"name": method}})
    return {str(k): v for k, v in design_limits(cfg).items()}


class EvalCounter:
    """Rows evaluated by the method's networks and by the teacher, while ``active``."""

    def __init__(self, method: nn.Module, teacher: Any) -> None:
        from fewstep.networks.mlp import MLP

        self.net_rows = self.teacher_rows = 0
        self.active = True
        self.handles, seen = [], set()
        for m in method.modules():
            net = m.net if isinstance(m, FlowMap) else m if isinstance(m, MLP) else None
            if net is not None and id(net) not in seen:
                seen.add(id(net))
                self.handles.append(net.register_forward_hook(self._net_hook))
        self.teacher = teacher
        if teacher is not None:
            inner = teacher.velocity

            def counted(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
                if self.active:
                    self.teacher_rows += int(x.shape[0])
                return inner(x, *a, **k)

            teacher.velocity = counted

    def _net_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.active and args:
            self.net_rows += int(args[0].shape[0])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.teacher is not None and "velocity" in vars(self.teacher):
            del self.teacher.velocity
