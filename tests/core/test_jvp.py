"""The JVP service: every mode against finite differences (MLP and attention), unwrapping, gradients, 2-rank sync."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from fewstep.core.flowmap import FlowMap
from fewstep.core.jvp import JVP_MODES, jvp, math_attention, unwrap_module
from fewstep.methods.base import Batch
from fewstep.methods.meanflow import MeanFlow
from fewstep.networks.mlp import MLP
from fewstep.teachers.presets import load_preset

torch.set_num_threads(1)


def _mlp_fn(seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    torch.manual_seed(seed)
    student = FlowMap(MLP(2, hidden=32, depth=2), "average_velocity").double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = 0.4 + 0.5 * torch.rand(6, generator=g, dtype=torch.float64)
    s = t * torch.rand(6, generator=g, dtype=torch.float64)
    v = torch.randn(6, 2, generator=g, dtype=torch.float64)
    return student, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s))


def _reference_fd(fn, primals, tangents, eps: float = 1e-5) -> Tensor:  # noqa: ANN001
    """Independent 4th-order central difference (f(-2h) - 8f(-h) + 8f(h) - f(2h)) / 12h in float64."""
    def at(k: float) -> Tensor:
        return fn(*[p + k * eps * v for p, v in zip(primals, tangents)])
    with torch.no_grad():
        return (at(-2) - 8 * at(-1) + 8 * at(1) - at(2)) / (12 * eps)


@pytest.mark.parametrize("mode", JVP_MODES)
def test_every_mode_matches_finite_differences_on_mlp(mode: str) -> None:
    student, primals, tangents = _mlp_fn()
    fn = lambda x, t, s: student.net(x, t, s, None)  # noqa: E731
    ref = _reference_fd(fn, primals, tangents)
    # fd: truncation error ~ eps^2 |f'''| with |d/dt| ~ 2*pi*32 from the sinusoidal embedding, hence a small eps
    out, tan = jvp(fn, primals, tangents, mode=mode, eps=1e-6)
    assert torch.allclose(out, fn(*primals), atol=1e-12)
    assert float((tan - ref).abs().max()) < (2e-5 if mode == "fd" else 1e-8)
    assert float(tan.abs().max()) > 0.1  # a non-trivial derivative
    assert not out.requires_grad and not tan.requires_grad  # stop-gradient by default


class TinyAttention(nn.Module):
    """One self-attention layer through scaled_dot_product_attention, on tokens of shape (B, L, D)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("mode", JVP_MODES)
def test_every_mode_matches_finite_differences_on_attention(mode: str) -> None:
    torch.manual_seed(0)
    net = TinyAttention().double()
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _reference_fd(net, (x,), (v,))
    out, tan = jvp(net, (x,), (v,), mode=mode, eps=1e-5)
    assert float((tan - ref).abs().max()) < (1e-6 if mode == "fd" else 1e-8)
    assert float(tan.abs().max()) > 0.05


def test_math_attention_selects_math_backend_and_restores() -> None:
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    with math_attention():
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()) == before


class _Wrapper(nn.Module):
    """A DDP-like wrapper whose own forward must never be traced by the JVP."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Tensor) -> Tensor:
        raise RuntimeError("the wrapper must be unwrapped")


def test_wrapper_is_unwrapped() -> None:
    lin = nn.Linear(3, 3).double()
    wrapped = _Wrapper(lin)
    assert unwrap_module(wrapped) is lin and unwrap_module(lin) is lin
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    _, tan = jvp(wrapped, (x,), (v,))
    assert torch.allclose(tan, v @ lin.weight.T, atol=1e-12)  # J v of a linear map is W v


def test_create_graph_gives_parameter_gradients_that_agree() -> None:
    """With create_graph=True the tangent is differentiable in the parameters; func and autograd agree."""
    student, primals, tangents = _mlp_fn(seed=4)
    fn = lambda x, t, s: student.net(x, t, s, None)  # noqa: E731
    grads = []
    for mode in ("func", "autograd"):
        student.zero_grad()
        _, tan = jvp(fn, primals, tangents, mode=mode, create_graph=True)
        assert tan.requires_grad
        tan.pow(2).sum().backward()
        # the last bias does not enter a Jacobian, so its gradient is None: count it as zero
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                for p in student.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-9) and float(grads[0].abs().max()) > 1e-3


def test_bad_inputs_raise() -> None:
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown jvp mode"):
        jvp(lambda y: y, (x,), (x,), mode="reverse")
    with pytest.raises(ValueError, match="tangent 0 must have the primal's shape"):
        jvp(lambda y: y, (x,), (torch.randn(3, 3),))
    with pytest.raises(ValueError, match="one tangent per primal"):
        jvp(lambda y: y, (x,), (x, x))
    with pytest.raises(ValueError, match="eps must be positive"):
        jvp(lambda y: y, (x,), (x,), mode="fd", eps=0.0)


# ------------------------------------------------------------------------------------ 2-process gloo test
def _meanflow_setup() -> tuple[MeanFlow, Batch]:
    """Identical student (seeded) and the same global batch on every rank."""
    teacher = load_preset("ring8").double()
    torch.manual_seed(0)
    student = FlowMap(MLP(2, hidden=32, depth=2), "average_velocity").double()
    method = MeanFlow(student, teacher, MeanFlow.make_config(jvp_mode="func"))
    g = torch.Generator().manual_seed(7)
    x0 = teacher.sample(16, generator=g, dtype=torch.float64)
    batch = Batch(x1=torch.randn(16, 2, generator=g, dtype=torch.float64),
                  u=torch.rand(16, 8, generator=g, dtype=torch.float64), x0=x0)
    return method, batch


def _flat_grad(method: MeanFlow, batch: Batch) -> Tensor:
    method.student.zero_grad()
    loss, _ = method.loss("student", batch, 0)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in method.student.parameters()])


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method, batch = _meanflow_setup()
        n = batch.size // world
        sl = slice(rank * n, (rank + 1) * n)
        shard = Batch(x1=batch.x1[sl], u=batch.u[sl], x0=batch.x0[sl])
        method.student.zero_grad()
        loss, _ = method.loss("student", shard, 0)
        loss.backward()
        try:
            from fewstep.training.distributed import allreduce_gradients

            allreduce_gradients(method.student)
        except ImportError:  # fallback while fewstep.training.distributed does not exist
            for p in method.student.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        torch.save(torch.cat([p.grad.reshape(-1) for p in method.student.parameters()]),
                   os.path.join(out_dir, f"grad{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_meanflow_gradients_match_global_batch() -> None:
    """Two gloo ranks, each with half the batch + explicit all-reduce == one process with the global batch."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank_main, args=(2, init_file, tmp), nprocs=2, join=True)
        g0, g1 = (torch.load(os.path.join(tmp, f"grad{r}.pt"), weights_only=True) for r in range(2))
    method, batch = _meanflow_setup()
    g_single = _flat_grad(method, batch)
    assert torch.equal(g0, g1)  # synchronised: bit-identical on both ranks
    assert torch.allclose(g0, g_single, rtol=1e-10, atol=1e-12)
    assert float(g_single.abs().max()) > 1e-3
